"""Answer metrics: the facts of an answer, fact recall, ROUGE-L, held-out questions."""

from __future__ import annotations

import pytest

from chatbot_trainer.evaluate.answers import (
    answer_report,
    answers_warning,
    extract_facts,
    fact_check,
    fact_recall,
    held_out_questions,
    rouge_l,
    score_answers,
)


def keys(text: str) -> list[str]:
    return [fact.key for fact in extract_facts(text)]


@pytest.mark.parametrize("written", ["$29", "$29.00", "29 USD", "USD 29", "29 dollars", "29 US dollars",
                                     "$ 29", "29.0 usd"])
def test_prices_in_several_formats_are_one_fact(written):
    assert keys(f"It costs {written} a month.") == ["price:USD 29"]
    assert fact_recall("The Pro plan is $29 per month.", f"Pro costs {written} per month.") == 1.0


def test_other_currencies_and_thousands():
    assert keys("€5 or 5 euros, £3, $1,000") == ["price:EUR 5", "price:GBP 3", "price:USD 1000"]
    assert fact_recall("It is €5.", "It is 5 EUR.") == 1.0
    assert fact_recall("It is €5.", "It is $5.") == 0.0


@pytest.mark.parametrize("written, value", [
    ("100 GB", "100 GB"), ("100GB", "100 GB"), ("100 gigabytes", "100 GB"), ("1TB", "1 TB"),
    ("30 minutes", "30 minute"), ("one second", "1 second"), ("a 7-day grace period", "7 day"),
    ("99.9%", "99.9 %"), ("100 requests per second", "100 request/second"),
    ("100 requests/s", "100 request/second"), ("three regions", "3 region"),
    ("5 business days", "5 business day"),
])
def test_numbers_with_units(written, value):
    assert keys(written) == [f"quantity:{value}"]


def test_urls_emails_bare_numbers_and_names():
    text = ("Go to https://www.acme.cloud/login/ and click \"Forgot password\". Write to Billing@Acme.cloud. "
            "Requests above the limit get HTTP 429. We accept Visa and American Express on the Pro plan.")
    assert keys(text) == ["url:acme.cloud/login", "name:forgot password", "email:billing@acme.cloud",
                          "number:429", "name:visa", "name:american express", "name:pro"]


def test_sentence_starts_and_common_acronyms_are_not_names():
    assert keys("Yes. Open the page. Requests are fine. I think the API is up.") == []
    assert keys("Acme Cloud runs in three regions.") == ["name:acme cloud", "quantity:3 region"]
    assert keys("The Team plan") == ["name:team"]


def test_a_paraphrase_that_keeps_the_facts_scores_one():
    reference = ("The Pro plan includes 100 GB of storage. You can buy more under Settings > Plan, "
                 "or email sales@acme.cloud.")
    paraphrase = "On pro you get 100GB. Need more? settings > plan lets you buy it, or write to sales@acme.cloud"
    assert fact_recall(reference, paraphrase) == 1.0
    assert rouge_l(reference, paraphrase) < 0.6  # the overlap score sees other words


def test_a_wrong_number_scores_zero():
    assert fact_recall("Storage is 100 GB.", "Storage is 1TB.") == 0.0
    assert fact_recall("The Pro plan costs $29.", "The price of Pro is $10.00") == pytest.approx(0.5)  # Pro stated
    assert fact_recall("It costs $29.", "The price is $10.00") == 0.0
    assert fact_recall("Retry after 1 second.", "Retry after 10 seconds.") == 0.0
    assert fact_recall("Call 429.", "Call 4290.") == 0.0


def test_fact_check_lists_what_was_missed():
    check = fact_check("The Starter plan includes 5 GB; see acme.cloud/pricing.", "Starter has 5 GB.")
    assert check == {"facts": ["Starter", "5 GB", "acme.cloud/pricing"], "stated": ["Starter", "5 GB"],
                     "missed": ["acme.cloud/pricing"]}
    assert fact_recall("You're welcome!", "Anything else?") is None  # nothing to check


def test_rouge_l_is_google_rouge_score():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat sat", "dogs run") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat on a mat") == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))


def test_held_out_questions_take_the_last_user_turn_with_its_context():
    conversations = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "price of Pro?"},
                      {"role": "assistant", "content": "Pro is $29."}]},
        {"messages": [{"role": "user", "content": "call a tool"},
                      {"role": "assistant", "content": "", "tool_calls": [{"name": "x"}]}]},
        {"messages": [{"role": "user", "content": "storage?"}, {"role": "assistant", "content": "5 GB."}]},
    ]
    questions = held_out_questions(conversations)
    assert [q["reference"] for q in questions] == ["Pro is $29.", "5 GB."]
    assert [m["content"] for m in questions[0]["messages"]] == ["Be brief.", "hi", "Hello!", "price of Pro?"]
    assert questions[1]["index"] == 2
    assert len(held_out_questions(conversations, limit=1)) == 1


def test_scores_base_against_fine_tuned_and_warns_when_worse():
    questions = [{"messages": [{"role": "user", "content": "price?"}], "reference": "The Pro plan is $29 per month."},
                 {"messages": [{"role": "user", "content": "thanks"}], "reference": "You're welcome!"}]
    good, bad = ["Pro costs $29 a month.", "You're welcome!"], ["It is $10.", "Bye"]
    scores = score_answers(questions, good)
    assert (scores["facts"], scores["facts_stated"], scores["fact_recall"]) == (2, 2, 1.0)
    assert scores["questions"] == 2 and scores["questions_with_facts"] == 1
    report = answer_report(questions, base=bad, fine_tuned=good)
    assert report["base"]["fact_recall"] == 0.0 and report["fine_tuned"]["rouge_l"] > report["base"]["rouge_l"]
    assert report["per_question"][0]["base_missed"] == ["Pro", "$29"]
    assert report["per_question"][0]["fine_tuned_missed"] == []
    assert answers_warning(report) is None
    worse = answers_warning(answer_report(questions, base=good, fine_tuned=bad))
    assert "worse than the base model's" in worse and "fact recall 0.000 vs 1.000" in worse
    with pytest.raises(ValueError):
        score_answers(questions, good[:1])
