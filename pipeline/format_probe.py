"""Unrequested formatting: does a reward model pay for a format marker the prompt never asked for?

A reward model trained on instruction-following pairs sees format markers (a P.S., ALL CAPS, a
<<title>>, a reply wrapped in double quotes) mostly on the chosen side, because the chosen answer is the
one that followed "add a P.S.". It can learn "marker present -> better" instead of "asked-for marker
present -> better", and PPO then adds the marker everywhere: reward hacking of the learned reward
(docs/results.md, session 11: the quickstart's PPO policy wrapped 45% of IFEval answers in quotes).

Two uses of the same transforms:
- `format_bias` probes a scorer: on answers whose prompt did not ask for a format, the share where the
  scorer prefers the answer with the format added (0.5 = indifferent; an unbiased model is below 0.5,
  since the change is unrequested). The reward stage logs it as `rm/format_bias/<name>`.
- `format_negative_pairs` makes preference pairs against it (chosen: an answer that follows its prompt;
  rejected: the same answer with an unrequested format added), for the data script.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

_CASE = ("change_case:english_capital", "change_case:english_lowercase", "change_case:capital_word_frequency")


@dataclass(frozen=True)
class Format:
    requested_by: tuple[str, ...]  # instruction ids that ask for this format (or that it would break)
    apply: Callable[[str], str]
    probe_only: bool = False  # measured by `format_bias`, not yet in the data script's pairs


FORMATS: dict[str, Format] = {
    "quotes": Format(("startend:quotation", "detectable_format:json_format"), lambda t: f'"{t}"'),
    "upper": Format(_CASE, str.upper),
    "lower": Format(_CASE, str.lower),
    "title": Format(("detectable_format:title",), lambda t: f"<<A Short Answer>>\n\n{t}"),
    "postscript": Format(("detectable_content:postscript", "startend:end_checker"),
                         lambda t: f"{t}\n\nP.S. I hope this helps."),
    # The contact line of the SFT data's placeholder demonstrations, which PPO learned to append to answers that
    # never asked for placeholders (docs/results.md, `recipes/ifeval.yaml`'s first run). It adds words, a
    # sentence, capitals and a new last phrase, so every id it could break counts as asking for it.
    "placeholders": Format(("detectable_content:number_placeholders", "startend:end_checker",
                            "detectable_content:postscript", "startend:quotation", "detectable_format:json_format",
                            "length_constraints:number_words", "length_constraints:number_sentences",
                            "keywords:forbidden_words", "keywords:frequency", "keywords:letter_frequency",
                            "language:response_language") + _CASE,
                           lambda t: f"{t} You can reach [name] at [email] or visit [address] for more.",
                           probe_only=True),
}


def unrequested(instruction_ids: list[str]) -> list[str]:
    """The FORMATS a prompt with these instruction ids did not ask for (nor would be broken by)."""
    ids = set(instruction_ids or [])
    return [name for name, f in FORMATS.items() if not ids & set(f.requested_by)]


def add_format(name: str, text: str) -> Optional[str]:
    """`text` with format `name` added; None when that changes nothing (already upper case, say)."""
    out = FORMATS[name].apply(text.strip())
    return out if out != text.strip() else None


@torch.no_grad()
def format_bias(scorer: Any, rows: list[dict], max_rows: int = 48) -> dict:
    """rows: {"prompt", "response", "instruction_id_list"}. For each format, over the first `max_rows` rows
    whose prompt did not ask for it: the share where `scorer.score` rates the formatted response above the
    response as it is. -> {"rm/format_bias/<name>": share, "rm/format_bias": mean of the shares}."""
    rows = [r for r in rows if r.get("instruction_id_list") is not None][:max_rows]
    if not rows:
        return {}
    base = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    out: dict = {}
    for name in FORMATS:
        idx, texts = [], []
        for i, r in enumerate(rows):
            t = add_format(name, r["response"]) if name in unrequested(r["instruction_id_list"]) else None
            if t is not None:
                idx.append(i)
                texts.append(t)
        if idx:
            marked = scorer.score([rows[i]["prompt"] for i in idx], texts)
            out[f"rm/format_bias/{name}"] = float((marked > base[idx]).float().mean())
    if out:
        out["rm/format_bias"] = sum(out.values()) / len(out)
    return out


def format_negative_pairs(prefs: list[dict], rng: random.Random, per_format: int) -> list[dict]:
    """Up to `per_format` pairs per format, each from a different preference row whose prompt did not ask for
    it: chosen = the row's chosen answer, rejected = it with the format added (`rejected_source`
    "unrequested_<name>"). Rows are drawn with `rng`; a row serves at most one format."""
    order = list(range(len(prefs)))
    rng.shuffle(order)
    used: set[int] = set()
    out: list[dict] = []
    for name, fmt in FORMATS.items():
        if fmt.probe_only:
            continue
        n = 0
        for j in order:
            if n >= per_format:
                break
            row = prefs[j]
            if j in used or name not in unrequested(row.get("instruction_id_list") or []):
                continue
            rejected = add_format(name, row["chosen"])
            if rejected is None:
                continue
            used.add(j)
            n += 1
            out.append({**{k: row[k] for k in ("prompt", "instruction_id_list", "kwargs") if k in row},
                        "chosen": row["chosen"], "rejected": rejected,
                        "chosen_source": row.get("chosen_source", "sample"), "rejected_source": f"unrequested_{name}"})
    return out
