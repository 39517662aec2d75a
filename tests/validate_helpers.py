"""What the request-validation tests share: the seeds' example requests, tools in both forms, and builders of
requests and tools with one part changed or removed (`...` removes a key)."""

from __future__ import annotations

import copy
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# The seeds' own example requests, and tools in both forms


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a friendly assistant"}, {"role": "user", "content": user}]


HELLO = chat("What is the origin of the phrase Hello, World")
PEP8 = chat("Tell me all about PEP-8")
PIZZA = chat("Why is pizza so good")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "latitude": {"type": "string", "description": "Latitude of the place"},
        "longitude": {"type": "string", "description": "Longitude of the place"},
    },
    "required": ["latitude", "longitude"],
}
PLAIN_TOOL = {"name": "getWeather", "description": "Current weather at a place", "parameters": WEATHER_PARAMETERS}
WRAPPED_TOOL = {"type": "function", "function": PLAIN_TOOL}
COUNTRY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "capital": {"type": "string"},
        "languages": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "capital", "languages"],
}


# ----------------------------------------------------------------------------------------------------------
# Builders for the invalid requests


def prm(**extra: Any) -> dict[str, Any]:
    return {"prompt": "Tell me all about PEP-8", **extra}


def msg(**extra: Any) -> dict[str, Any]:
    return {"messages": copy.deepcopy(HELLO), **extra}


def tool_request(tool: Any) -> dict[str, Any]:
    return msg(tools=[tool])


def plain_tool(**changes: Any) -> dict[str, Any]:
    tool = copy.deepcopy(PLAIN_TOOL)
    tool.update(changes)
    return {k: v for k, v in tool.items() if v is not ...}


def wrapped_tool(**changes: Any) -> dict[str, Any]:
    function = copy.deepcopy(PLAIN_TOOL)
    function.update(changes)
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not ...}}


def parameters(**changes: Any) -> dict[str, Any]:
    params = copy.deepcopy(WEATHER_PARAMETERS)
    params.update(changes)
    return {k: v for k, v in params.items() if v is not ...}


def weather_property(**changes: Any) -> dict[str, Any]:
    prop = {"type": "string", "description": "Latitude"}
    prop.update(changes)
    return parameters(properties={"latitude": {k: v for k, v in prop.items() if v is not ...}})


NAN, INF = float("nan"), float("inf")
