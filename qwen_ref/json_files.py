"""Operator-supplied JSON files (config.json, generation_config.json, the safetensors index, tokenizer and adapter
configs) read in one place: whatever is wrong with one (missing, unreadable, not UTF-8, not JSON, nested too
deeply, too large, the wrong kind of value) is the caller's typed error naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_ref.errors import QwenRefError

MAX_JSON_FILE_BYTES = 64 * 2**20  # far above any real config; tokenizer.json is read by `tokenizers`, not here


def parse_json_text(data: bytes, where: str, error: type[QwenRefError], kind: type | None = None) -> Any:
    """JSON from bytes, or error(f"{where}: ...")."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, an integer of too many digits
        raise error(f"{where}: not valid JSON ({e})") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{where}: expected a JSON {'object' if kind is dict else kind.__name__}, got "
                    f"{type(value).__name__}")
    return value


def read_json_file(path: Path, error: type[QwenRefError], kind: type | None = dict) -> Any:
    """A JSON file's value (an object by default), or error naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise error(f"{path}: {size} bytes; a JSON file here may have at most {MAX_JSON_FILE_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json_text(data, str(path), error, kind)
