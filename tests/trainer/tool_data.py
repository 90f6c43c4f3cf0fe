"""A small glaive-like tool-calling data set, in OpenAI and ShareGPT (LLaMA-Factory) form.

Tools with different parameter schemas, so that a columnar file's unified schema differs from
every single tool's; some conversations only define tools, some call them, some repeat an
earlier conversation. OpenAI rows carry random tool-call ids, as OpenAI exports do.
"""

from __future__ import annotations

import json
import random
import uuid

TOOLS = {
    "get_weather": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["city"]},
    },
    "search_recipes": {
        "name": "search_recipes",
        "description": "Find recipes by ingredients",
        "parameters": {"type": "object", "properties": {
            "ingredients": {"type": "array", "items": {"type": "string"}},
            "diet": {"type": "string"},
        }, "required": ["ingredients"]},
    },
    "calculate_area": {
        "name": "calculate_area",
        "description": "Area of a shape",
        "parameters": {"type": "object", "properties": {
            "shape": {"type": "string", "description": "circle, square or rectangle"},
            "dimensions": {"type": "object", "properties": {
                "length": {"type": "number"}, "width": {"type": "number"}, "radius": {"type": "number"},
            }},
        }, "required": ["shape", "dimensions"]},
    },
    "get_movie_details": {
        "name": "get_movie_details",
        "description": "Details of a movie",
        "parameters": {"type": "object", "properties": {
            "movie_id": {"type": "integer", "minimum": 1},
            "language": {"type": "string"},
        }, "required": ["movie_id"]},
    },
}

CALLS = [
    ("get_weather", {"city": "Paris"}, '{"temp_c": 18, "sky": "cloudy"}', "It is 18 °C and cloudy in Paris."),
    ("get_weather", {"city": "Oslo", "unit": "celsius"}, '{"temp_c": -3}', "It is -3 °C in Oslo."),
    ("search_recipes", {"ingredients": ["eggs", "spinach"]}, '{"recipes": ["Spinach omelette"]}',
     "Try a spinach omelette."),
    ("calculate_area", {"shape": "rectangle", "dimensions": {"length": 4, "width": 3}}, '{"area": 12}',
     "The area is 12."),
    ("calculate_area", {"shape": "circle", "dimensions": {"radius": 2}}, '{"area": 12.57}',
     "The area is about 12.57."),
    ("get_movie_details", {"movie_id": 42}, '{"title": "Arrival", "year": 2016}', "That is Arrival (2016)."),
]


def tool_conversations(n: int = 50, seed: int = 7) -> list[dict]:
    """Abstract conversations: (question, calls or None, tools offered, final answer)."""
    rng = random.Random(seed)
    names = list(TOOLS)
    rows = []
    for i in range(n):
        if i >= 10 and i % 7 == 0:  # a repeat of an earlier conversation
            rows.append(dict(rows[rng.randrange(len(rows))]))
            continue
        offered = rng.sample(names, rng.randint(1, 3))
        if i % 3 == 2:  # defines tools, calls none
            rows.append({"question": f"Tell me a fact about the number {i}.", "call": None,
                         "tools": offered, "answer": f"{i} is a number I like."})
            continue
        name, args, result, answer = CALLS[i % len(CALLS)]
        if name not in offered:
            offered.append(name)
        rows.append({"question": f"Question {i} about {name}?", "call": (name, args, result),
                     "tools": offered, "answer": answer})
    return rows


def openai_rows(conversations: list[dict], seed: int = 1, arguments: str = "text") -> list[dict]:
    """OpenAI rows; tool-call ``arguments`` as JSON ``"text"`` (OpenAI's form) or ``"object"``."""
    rng = random.Random(seed)
    rows = []
    for c in conversations:
        messages = [{"role": "user", "content": c["question"]}]
        if c["call"]:
            name, args, result = c["call"]
            call_id = "call_" + uuid.UUID(int=rng.getrandbits(128)).hex[:24]
            messages += [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args) if arguments == "text" else args}}]},
                {"role": "tool", "tool_call_id": call_id, "content": result},
            ]
        messages.append({"role": "assistant", "content": c["answer"]})
        rows.append({"messages": messages,
                     "tools": [{"type": "function", "function": TOOLS[t]} for t in c["tools"]]})
    return rows


def sharegpt_rows(conversations: list[dict]) -> list[dict]:
    rows = []
    for c in conversations:
        turns = [{"from": "human", "value": c["question"]}]
        if c["call"]:
            name, args, result = c["call"]
            turns += [{"from": "function_call", "value": json.dumps({"name": name, "arguments": args})},
                      {"from": "observation", "value": result}]
        turns.append({"from": "gpt", "value": c["answer"]})
        rows.append({"conversations": turns, "tools": json.dumps([TOOLS[t] for t in c["tools"]])})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


CITIES = ["Paris", "Oslo", "Madrid", "Berlin", "Tokyo", "Cairo", "Lima", "Dublin", "Prague", "Vienna",
          "Nairobi", "Toronto", "Seoul", "Athens", "Warsaw", "Quito", "Hanoi", "Perth", "Porto", "Riga"]
ASKS = ["What is the weather in {}?", "How warm is it in {} right now?", "Is it raining in {}?",
        "Weather for {} please.", "Do I need a coat in {} today?", "What's it like outside in {}?"]


def weather_conversations(n: int = 48, seed: int = 3) -> list[dict]:
    """Conversations that call get_weather with the city asked about (search_recipes offered too,
    so the model must pick the tool), in the abstract form of tool_conversations."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        temp = rng.randint(-5, 30)
        rows.append({"question": ASKS[i % len(ASKS)].format(city),
                     "call": ("get_weather", {"city": city}, json.dumps({"temp_c": temp})),
                     "tools": ["get_weather", "search_recipes"], "answer": f"It is {temp} °C in {city}."})
    return rows
