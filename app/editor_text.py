"""Text the editor rewrites when it queues a prompt: dynamic prompts (``{a|b}``, comments) in STRING
widgets, and ``%date:...%`` / ``%Node.widget%`` values in Save nodes' filename prefixes."""

from __future__ import annotations

import datetime as _dt
import random
import re


def js_str(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def format_date(fmt: str, now: _dt.datetime) -> str:
    parts = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}

    def token(m):
        t = m.group(0)
        if t == "yy":
            return str(now.year)[2:]
        if t == "yyyy":
            return str(now.year)
        if t[0] in parts:
            return str(parts[t[0]]).zfill(len(t))
        return t

    return re.sub(r"dd?|MM?|hh?|mm?|ss?|yyy?y?", token, fmt)


def dynamic_prompt(text: str, rng: random.Random) -> str:
    """The frontend's dynamic prompts: strip // and /* */ comments, pick one of {a|b|c} (nested too)."""
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    pos = 0

    def escape() -> str:  # a backslash and the character it escapes, kept for the final unescape
        nonlocal pos
        out = "\\" + (text[pos] if pos < len(text) else "")
        pos += 1
        return out

    def choice_block() -> str:
        nonlocal pos
        options, current, depth = [], "", 0
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if ch == "\\":
                current += escape()
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                if not depth:
                    break
                depth -= 1
            elif ch == "|" and not depth:
                options.append(current)
                current = ""
                continue
            current += ch
        options.append(current)
        return dynamic_prompt(options[rng.randrange(len(options))], rng)

    out = ""
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if ch == "\\":
            out += escape()
        elif ch == "{":
            out += choice_block()
        else:
            out += ch
    return re.sub(r"\\([{}|])", r"\1", out)
