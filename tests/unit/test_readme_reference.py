"""The spec reference in README.md is generated from the schema and must be current."""

from chatbot_api.reference import README, updated_readme


def test_readme_spec_reference_is_current():
    text = README.read_text()
    assert updated_readme(text) == text, "README.md is stale: run python -m chatbot_api.reference --write"
