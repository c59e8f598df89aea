"""The judge over any OpenAI-compatible chat-completions endpoint, and the log of its verdicts.

The `openai` client retries rate limits (429), server errors and timeouts with exponential
backoff and honours Retry-After; nothing here re-implements that. The API key is read from the
environment variable the judge config names and goes nowhere else: not into a log, a config
or the verdicts file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..tasks.base import DataError
from ..config import check_env_name
from ..errors import LolRlError
from .pairs import ORDERS, VERDICTS

NO_KEY = "no-key"  # a local server checks no key, but the client insists on one


class JudgeError(LolRlError, RuntimeError):
    """The judge endpoint failed after its retries, or an out dir holds another judging; one line."""


def make_client(judge_cfg, max_retries: int, timeout: float):
    from openai import OpenAI

    env = judge_cfg.api_key_env
    check_env_name("judge.api_key_env", env)  # a key pasted into a yaml file
    api_key = os.environ.get(env) if env else NO_KEY
    if not api_key:
        raise JudgeError(f"judge {judge_cfg.name}: environment variable {env} is empty or not set; "
                         f"the API key is read from it (and never from a config)")
    return OpenAI(base_url=judge_cfg.base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)


def ask(client, judge_cfg, prompt: str) -> str:
    """The judge's answer text to one prompt ('' when the completion has none). A failure
    that outlived the client's retries stops the run; what was answered is already logged."""
    import openai

    try:
        completion = client.chat.completions.create(
            model=judge_cfg.model, messages=[{"role": "user", "content": prompt}],
            temperature=judge_cfg.temperature, max_tokens=judge_cfg.max_tokens,
        )
    except openai.AuthenticationError:  # its message may quote part of the key: not shown
        raise JudgeError(f"judge {judge_cfg.base_url}: HTTP 401, the key was refused; check the key in "
                         f"${judge_cfg.api_key_env or '(no api_key_env set)'}") from None
    except openai.APIStatusError as err:
        detail = err.body.get("message") if isinstance(err.body, dict) else None
        raise JudgeError(f"judge {judge_cfg.base_url}: HTTP {err.status_code} after {client.max_retries} "
                         f"retries: {_first_line(detail or err.message, client.api_key)}") from None
    except openai.APIError as err:  # timeouts and connection failures, once retries are spent
        raise JudgeError(f"judge {judge_cfg.base_url}: {type(err).__name__} after {client.max_retries} "
                         f"retries: {_first_line(str(err), client.api_key)}") from None
    except ValueError as err:  # a 200 whose body is not JSON: not a chat-completions endpoint
        raise JudgeError(f"judge {judge_cfg.base_url}: the answer is not a chat completion ({err}); "
                         f"base_url must be an OpenAI-compatible endpoint ending in /v1") from None
    choices = getattr(completion, "choices", None)
    if not choices:
        return ""
    return choices[0].message.content or ""


def _first_line(text: str, api_key: str) -> str:
    """An error's first line, with the key blanked should a server echo it back."""
    text = text.replace(api_key, "***") if api_key else text
    return text.strip().splitlines()[0][:200] if text.strip() else "(no message)"


def read_verdicts(path: Path) -> tuple[dict[tuple[str, str], dict], int]:
    """Every logged call by (pair id, order), and the byte length of the complete lines. A last
    line without its newline is a write cut short by a kill: it is not counted (unless it is a
    whole record), and the caller truncates the file there. A bad line elsewhere is an error."""
    if not path.is_file():
        return {}, 0
    data = path.read_bytes()
    records, offset = {}, 0
    lines = data.split(b"\n")
    for line_no, line in enumerate(lines, start=1):
        torn = line_no == len(lines)  # after the last newline: empty, or cut short
        if not line.strip():
            offset += len(line) + (not torn)
            continue
        try:
            record = _check_record(json.loads(line), f"{path}:{line_no}")
        except (json.JSONDecodeError, UnicodeDecodeError, DataError) as err:
            if torn:
                break
            raise DataError(f"{path}:{line_no}: not a verdict record ({err}); "
                            f"expected {{pair, order, segment, verdict, answer}}") from None
        records[(record["pair"], record["order"])] = record
        offset += len(line) + (not torn)
    return records, offset


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict) or not isinstance(record.get("pair"), str) or record.get("order") not in ORDERS:
        raise DataError(f"{where}: needs 'pair' (a string) and 'order' ({' or '.join(ORDERS)})")
    if record.get("verdict") not in (*VERDICTS, None) or not isinstance(record.get("answer"), str):
        raise DataError(f"{where}: needs 'verdict' ({', '.join(VERDICTS)} or null) and 'answer' (a string)")
    return record


class VerdictLog:
    """<out>/verdicts.jsonl: one line per judge call, flushed as it is written, so a killed run
    loses at most the call in flight and a rerun skips every call already answered."""

    def __init__(self, path: Path):
        self.path = path
        self.done, complete = read_verdicts(path)
        if path.exists():  # drop a torn last line; a whole record that lost only its newline gets it back
            with path.open("r+b") as f:
                f.truncate(complete)
                f.seek(max(complete - 1, 0))
                if complete and f.read(1) != b"\n":
                    f.seek(complete)
                    f.write(b"\n")
        self._file = path.open("a", encoding="utf-8")

    def add(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done[(record["pair"], record["order"])] = record

    def close(self) -> None:
        self._file.close()

