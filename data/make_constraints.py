"""Make the built-in instruction-following task: SFT demonstrations, preference pairs, RL prompts and
held-out prompts, IFEval style (`prompt`, `instruction_id_list`, `kwargs`), checkable by
`pipeline.checkers`.

    python data/make_constraints.py            # 3-8 minutes on 2 CPU cores (model sampling; cached)
    python data/make_constraints.py --skip-model   # template content only, for debugging

Deterministic for a seed. Topics, task framings and instruction phrasings come in two disjoint pools:
the training splits (sft, prefs, prompts) draw from TRAIN_*, the held-out split from HELDOUT_*, so the
held-out numbers measure generalisation to phrasings and topics never trained on.

Content: the default model's own answers to the bare task (no instruction), cut to whole sentences
without the greedy loops, then made to satisfy the instructions with `checkers.apply_constraints` (SFT). Preference pairs are
real samples of the default model given the instruction, judged by the checkers: chosen passes
(a sample, or a repaired sample when none passed), rejected fails (a sample, or when every sample
passed, the chosen text with one instruction undone).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.checkers import apply_constraints, check_record  # noqa: E402
from pipeline.ifeval import assert_no_ifeval_prompts, find_ifeval_prompts  # noqa: E402

LOWER, CAPITAL, NO_COMMA = "change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma"
WORDS, END, KEYWORDS = "length_constraints:number_words", "startend:end_checker", "keywords:existence"
BULLETS, QUOTE = "detectable_format:number_bullet_lists", "startend:quotation"
IDS = [LOWER, CAPITAL, NO_COMMA, WORDS, END, KEYWORDS, BULLETS, QUOTE]
INCOMPATIBLE = [{LOWER, CAPITAL}, {QUOTE, BULLETS}, {NO_COMMA, END}]

TRAIN_TOPICS = [
    "the ocean", "honeybees", "volcanoes", "the moon", "coffee", "bicycles", "rainforests", "chess",
    "the human heart", "autumn", "libraries", "trains", "penguins", "gardening", "thunderstorms", "bread baking",
    "the piano", "deserts", "recycling", "owls", "the solar system", "running", "mountains", "tea",
    "friendship", "lighthouses", "dinosaurs", "rivers", "snow", "photography", "elephants", "the internet",
    "camping", "museums", "cats", "dogs", "clouds", "sleep", "the printing press", "bridges",
    "wind power", "coral reefs", "spiders", "jazz music", "kites", "maps", "the alphabet", "windmills",
    "sunflowers", "old castles", "robots", "fire safety", "hiking boots", "street markets", "whales",
    "soap bubbles", "paper airplanes", "the post office", "tomatoes", "swimming",
    'kangaroos',
    'lemons',
    'umbrella stands',
    'skateboards',
    'the desert fox',
    'rainbows',
    'ice skating',
    'candles',
    'the metro',
    'sea turtles',
    'backpacks',
    'the harvest moon',
    'apple orchards',
    'board games',
    'the Great Wall',
    'radio',
    'sailing boats',
    'puzzles',
    'volunteering',
    'a school library',
    'pianos in parks',
    'knitting',
    'mushrooms',
    'bees in winter',
    'the Arctic',
    'hummingbirds',
    'pancakes',
    'fountain pens',
    'early mornings',
    'city parks',
    'lanterns',
    'the night sky',
    'frogs',
    'rock climbing',
    'picnics',
    'electric cars',
    'the rain',
    'sandcastles',
    'quilts',
    'foxes',
    'seashells',
    "a farmers' market",
    'the wind',
    'astronauts',
    'tulips',
    'guitars',
    'a small bakery',
    'caves',
    'hedgehogs',
    'maple syrup',
    'bird migration',
    'trains at night',
    'a treehouse',
    'sunsets',
    'honey',
    'the zoo',
    'comets',
    'clocks',
    'mountain lakes',
    'letters by post',
]
HELDOUT_TOPICS = [
    "a mechanical wristwatch", "glaciers", "the violin", "origami", "submarines", "a rooftop garden",
    "hot air balloons", "octopuses", "a night bus", "fermentation", "a public park bench", "the first telephone",
    "wolves", "sand dunes", "a lost umbrella", "pottery", "a city marathon", "fireflies", "tide pools",
    "a village bakery", "meteor showers", "an old typewriter", "beekeeping suits", "the compass", "a ferry ride",
]
TRAIN_TASKS = [
    "Write a short poem about {t}.", "Describe {t}.", "Explain {t} to a child.", "Write a short story about {t}.",
    "Give some tips about {t}.", "Write a paragraph about {t}.", "Tell me a few facts about {t}.",
    "Write a short blog post about {t}.", "Why do people like {t}?", "Write a short note to a friend about {t}.",
    'Write a haiku-like short poem about {t}.',
    'Give a brief overview of {t}.',
    'Write an encyclopedia-style entry on {t}.',
    'Write a short advertisement for {t}.',
    'Share your thoughts on {t}.',
    'Write a short speech about {t}.',
    'Describe a day spent with {t}.',
    'Write a short letter about {t}.',
    'What is interesting about {t}?',
    'Write a few sentences for a travel guide about {t}.',
    'Create a short lesson plan about {t}.',
    'List some things you know about {t}.',
    'Write a short news report about {t}.',
    'Explain why {t} matters.',
    'Write a riddle-style description of {t}.',
]
HELDOUT_TASKS = [
    "Compose a product review of {t}.", "Draft a museum placard describing {t}.",
    "Pretend you are a tour guide and introduce {t}.", "Write a diary entry about {t}.",
    "Summarize what a beginner should know about {t}.",
]

# Instruction phrasings: (training pool, held-out pool). Placeholders are filled from the kwargs.
PHRASINGS = {
    LOWER: ([
        "Your entire response should be in English, and in all lowercase letters.",
        "Write everything in lowercase; no capital letters.", "Use only lower-case characters in your reply.",
        "Please answer in all lowercase letters.", "Do not use any uppercase letters.",
        "Your answer must be entirely lowercase.", "Respond using lowercase letters only.",
        "Keep every letter of your response in lowercase.", "No capital letters are allowed in your answer.",
        'Lowercase only, please.',
        "Don't capitalize anything, not even names or the start of a sentence.",
        'Avoid uppercase characters completely.',
        'Pretend your keyboard has no capital letters.',
        'write your whole reply in lowercase like this sentence.',
        'Format rule: all lower case.',
        'The reply may not contain a single capital letter.',
        'Make all of the letters lowercase.',
        'I only want to see lowercase letters in the answer.',
        'Sentence starts must not be capitalised either; use lowercase throughout.',
        'Write like a casual text message with zero capitals.',
        'Stick to lowercase from the first word to the last.',
        'Uppercase letters are forbidden in this reply.',
        'Everything you output should be lower-cased.',
    ], [
        "Every single character you write has to be a small letter.",
        "Make sure nothing in the reply is capitalized, not even the first word.",
        "Type it the way you would with caps lock off and no shift key.",
    ]),
    CAPITAL: ([
        "Your entire response should be in English, and in all capital letters.", "Write your answer in all caps.",
        "Respond using only uppercase letters.", "Use capital letters for the whole response.",
        "Your answer must be entirely in uppercase.", "Please write everything in CAPITAL LETTERS.",
        "Every letter of your reply should be uppercase.", "Answer in all capital letters only.",
        'Use ALL CAPS.',
        'Write the whole reply in block capitals.',
        'Every letter in the answer must be a capital.',
        'Make your answer uppercase from start to finish.',
        'I want it all in uppercase, like a newspaper headline.',
        'Lowercase letters are not allowed in this reply.',
        'Capitalize every letter of every word.',
        'Format rule: all uppercase.',
        'Type the complete response in capitals only.',
        'The reply must not contain any lowercase letter.',
        'Respond entirely in upper-case letters.',
        'Put the whole text in capital letters, with nothing in lowercase.',
        'CAPITAL LETTERS ONLY, PLEASE.',
        'Convert every word of your reply to uppercase.',
    ], [
        "Shout the whole thing: every letter must be upper case.",
        "Format the reply so that no lowercase letter appears anywhere.",
        "Write it as if caps lock were stuck on.",
    ]),
    NO_COMMA: ([
        "Do not use any commas in your response.", "Avoid commas entirely.", "Your answer must not contain commas.",
        "Write without using a single comma.", "Please refrain from using commas.", "No commas are allowed.",
        "Make sure your response has no commas.", "Do not include the comma character anywhere.",
        'Commas are forbidden.',
        'Leave out every comma.',
        'Write in a style that never uses a comma.',
        'Use periods instead of commas.',
        'Not one comma should appear in the text.',
        'Format rule: zero commas.',
        'Your sentences must be written with no commas at all.',
        'Please skip commas completely.',
        'Split ideas into short sentences instead of using commas.',
        'The reply is only valid if it has no comma in it.',
        'Rewrite any list so that it needs no commas.',
        'Drop all commas from your writing.',
    ], [
        "The punctuation mark ',' is banned from your answer.",
        "Keep the text free of that little mark that separates list items.",
        "Any comma in the reply makes it wrong, so leave them out.",
    ]),
    WORDS: ([
        "Answer with {relation} {num_words} words.", "Your response should contain {relation} {num_words} words.",
        "Use {relation} {num_words} words.", "The response must be {relation} {num_words} words long.",
        "Write {relation} {num_words} words in total.", "Keep your answer to {relation} {num_words} words.",
        "Make the reply {relation} {num_words} words.", "Your answer needs {relation} {num_words} words.",
        'Stay {relation} {num_words} words.',
        'Length: {relation} {num_words} words.',
        'Please write {relation} {num_words} words.',
        'Aim for {relation} {num_words} words.',
        'Keep the reply {relation} {num_words} words in length.',
        'The total number of words must be {relation} {num_words}.',
        'Your text should have {relation} {num_words} words.',
        'Count your words: {relation} {num_words}.',
        'Limit or extend the answer so it has {relation} {num_words} words.',
        'Write a reply of {relation} {num_words} words.',
    ], [
        "The word count of the reply should be {relation} {num_words}.",
        "Length requirement: {relation} {num_words} words overall.",
        "I will count the words, and there must be {relation} {num_words} of them.",
    ]),
    END: ([
        "Finish your response with this exact phrase: {end_phrase}", "End your answer with the phrase \"{end_phrase}\".",
        "Your reply must end with the words \"{end_phrase}\" and nothing after them.",
        "Conclude with exactly: {end_phrase}", "The last words of your response should be: {end_phrase}",
        "Close your answer with \"{end_phrase}\".", "Make sure the final phrase is \"{end_phrase}\".",
        "End with the sentence \"{end_phrase}\" and add nothing after it.",
        'Your final sentence must be exactly "{end_phrase}"',
        'Let the reply end with "{end_phrase}"',
        'Put "{end_phrase}" at the very end.',
        'Last line: {end_phrase}',
        'After your answer, end with "{end_phrase}" and stop there.',
        'The text must finish with the words: {end_phrase}',
        'Close with the line "{end_phrase}" and write nothing more.',
        'Complete your reply with "{end_phrase}" as the final words.',
        'Make "{end_phrase}" the ending of your answer.',
        'Stop writing right after "{end_phrase}".',
    ], [
        "Sign off with \"{end_phrase}\" as the very last thing you write.",
        "Nothing may follow the closing line \"{end_phrase}\".",
        "Wrap up by writing \"{end_phrase}\"; that must be the end of the text.",
    ]),
    KEYWORDS: ([
        "Include the keywords {kw} in the response.", "Make sure to use the words {kw}.",
        "Your answer must mention {kw}.", "Use the following words somewhere in your reply: {kw}.",
        "Be sure to include {kw}.", "The response should contain the words {kw}.",
        "Work the words {kw} into your answer.", "Please include these keywords: {kw}.",
        'Mention {kw} at least once.',
        'Use {kw} in your answer.',
        'Your text has to include {kw}.',
        "Don't forget to use the words {kw}.",
        'Somewhere, use {kw}.',
        'Required words: {kw}.',
        'Make sure {kw} both appear.',
        'The answer should use the terms {kw}.',
        'Include {kw} somewhere in the text.',
        'Try to fit {kw} into your writing.',
    ], [
        "Somewhere in the text the terms {kw} have to show up.",
        "A reader should be able to find {kw} in what you write.",
        "Weave in {kw}; each must appear at least once.",
    ]),
    BULLETS: ([
        "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n* This is point 1.",
        "Use exactly {num_bullets} markdown bullet points (\"* \") in your answer.",
        "Format your response as exactly {num_bullets} bullet points starting with \"* \".",
        "Give exactly {num_bullets} bullet points, each starting with an asterisk.",
        "Answer in exactly {num_bullets} bullets using \"* \".", "Write exactly {num_bullets} bullet points.",
        "Your reply should be a list of exactly {num_bullets} markdown bullets.",
        "Respond with {num_bullets} bullet points, no more and no fewer.",
        'Give your answer as {num_bullets} bullet points.',
        'Use a markdown list with exactly {num_bullets} items ("* ").',
        'Structure the reply as {num_bullets} points, each on its own line starting with "* ".',
        'Exactly {num_bullets} bullets, please.',
        'Write {num_bullets} list items using asterisks.',
        'Format: a bulleted list of {num_bullets} items.',
        'Make a list with {num_bullets} bullet points and nothing else.',
        'Present {num_bullets} points as a markdown bullet list.',
        'I want {num_bullets} bullet points, not more, not less.',
        'Reply with a {num_bullets}-item bullet list.',
    ], [
        "Lay the reply out as a list of {num_bullets} lines that each begin with '* '.",
        "I need precisely {num_bullets} starred list items and nothing else formatted as a list.",
        "Break it into {num_bullets} asterisk-led points.",
    ]),
    QUOTE: ([
        "Wrap your entire response with double quotation marks.", "Put your whole answer inside double quotes.",
        "Enclose the entire response in double quotation marks.", "Your reply must start and end with a double quote.",
        "Surround your full answer with \" marks.", "Place the entire answer between double quotes.",
        "Quote your whole response using double quotation marks.", "Your whole answer should be in double quotes.",
        'Put quotation marks around your entire reply.',
        'The full answer should be enclosed in "double quotes".',
        'Begin and end the response with a double quotation mark.',
        'Wrap everything in double quotes.',
        'Format your reply as a single quoted passage in double quotes.',
        'Start your answer with " and end it with ".',
        'Make the whole response a quotation, inside double quotes.',
        'Surround the entire text with double quotation marks.',
        'Your reply should be one quoted block, in double quotes.',
        'Use double quotes around the whole answer.',
    ], [
        "The very first and very last characters of the reply have to be the \" symbol.",
        "Present everything you write as one big quotation with double quote marks around it.",
        "Open the answer with a double quote and close it with one.",
    ]),
}
TRAIN_END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
                     "That is all for today.", "Thanks for reading.", "Have a great day.", "I hope this helps."]
HELDOUT_END_PHRASES = ["Any other questions?", "See you next time.", "The end."]
TRAIN_KEYWORDS = ["bright", "quiet", "history", "future", "simple", "journey", "energy", "color", "water", "morning",
                  "light", "friendly", "careful", "ancient", "small", "green", "music", "winter", "family", "safe"]
HELDOUT_KEYWORDS = ["precise", "curious", "gentle", "harbor", "silver", "patience", "echo", "craft"]


# SFT content: greedy, long enough for "at least 80 words", with HF's repetition penalty so that the
# small model's greedy loops do not become demonstrations (1.2 measured: no loops, on-topic prose).
CONTENT_TOKENS = 160
CONTENT_REPETITION_PENALTY = 1.2


def sample_kwargs(iid: str, rng: random.Random, heldout: bool) -> dict:
    if iid == WORDS:
        if rng.random() < 0.5:
            return {"relation": "less than", "num_words": rng.choice([30, 40, 50, 60, 80])}
        return {"relation": "at least", "num_words": rng.choice([40, 50, 60, 70, 80])}
    if iid == END:
        return {"end_phrase": rng.choice(HELDOUT_END_PHRASES if heldout else TRAIN_END_PHRASES)}
    if iid == KEYWORDS:
        return {"keywords": rng.sample(HELDOUT_KEYWORDS if heldout else TRAIN_KEYWORDS, 2)}
    if iid == BULLETS:
        return {"num_bullets": rng.choice([2, 3, 4, 5])}
    return {}


def phrase(iid: str, kwargs: dict, rng: random.Random, heldout: bool) -> str:
    template = rng.choice(PHRASINGS[iid][1 if heldout else 0])
    fill = dict(kwargs)
    if "keywords" in kwargs:
        fill["kw"] = " and ".join(f'"{k}"' for k in kwargs["keywords"])
    return template.format(**fill)


def make_prompt(rng: random.Random, heldout: bool, counts: dict[str, int]) -> dict:
    topic = rng.choice(HELDOUT_TOPICS if heldout else TRAIN_TOPICS)
    task = rng.choice(HELDOUT_TASKS if heldout else TRAIN_TASKS).format(t=topic)
    # Balance the ids: draw the least used one first.
    first = min(IDS, key=lambda i: (counts[i], rng.random()))
    ids = [first]
    if rng.random() < 0.3:
        options = [i for i in IDS if i != first and not any({first, i} <= bad for bad in INCOMPATIBLE)]
        ids.append(min(options, key=lambda i: (counts[i], rng.random())))
    for i in ids:
        counts[i] += 1
    kwargs = [sample_kwargs(i, rng, heldout) for i in ids]
    prompt = " ".join([task] + [phrase(i, k, rng, heldout) for i, k in zip(ids, kwargs)])
    return {"prompt": prompt, "task": task, "topic": topic, "instruction_id_list": ids, "kwargs": kwargs}


def _ngrams(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def whole_sentences(text: str, max_sentences: int = 4, max_words: int = 60) -> str:
    """The leading whole sentences of ``text`` within the limits, skipping repeats.

    A sentence is skipped when half or more of its word 4-grams (or, for a short sentence, its
    whole word sequence) already occurred: greedy answers of a small model loop ("They are made of
    walls and floors that are made of walls and floors ..."), and demonstrations that loop teach
    the loop.
    """
    text = re.sub(r"\s+", " ", text.replace("*", " ").replace("#", " ")).strip()
    parts = re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+", text)
    out: list[str] = []
    seen: set[tuple[str, ...]] = set()
    seen_sentences: set[tuple[str, ...]] = set()
    for p in parts:
        if not re.search(r"[.!?][\"')\]]*$", p):
            break
        if p.endswith('"') and p.count('"') % 2:
            p = p[:-1]  # a stray closing quote ("... confidence.\"") would leave the text unbalanced
        words = re.findall(r"\w+", p.lower())
        grams = _ngrams(words)
        if tuple(words) in seen_sentences or (grams and len(grams & seen) * 2 >= len(grams)):
            continue
        if sum(len(x.split()) for x in out) + len(p.split()) > max_words:
            break
        out.append(p)
        seen |= grams
        seen_sentences.add(tuple(words))
        if len(out) >= max_sentences:
            break
    return " ".join(out)


def content_limits(rec: dict) -> dict:
    """``whole_sentences`` limits for a record: short by default, enough for an "at least N words" one.

    N + 15 words keeps a reply for N = 80 inside the eval's 128 new tokens; a list gets one sentence
    per bullet where the text has them.
    """
    pairs = list(zip(rec["instruction_id_list"], rec["kwargs"]))
    at_least = [kw["num_words"] for i, kw in pairs if i == WORDS and kw["relation"] == "at least"]
    # One sentence per bullet where the text has them (else bullets are cut mid-sentence).
    bullets = [kw["num_bullets"] for i, kw in pairs if i == BULLETS]
    if at_least:
        return {"max_sentences": 12, "max_words": max(at_least) + 15}
    return {"max_sentences": max([4] + bullets), "max_words": 60}


TEMPLATE_FACTS = [
    "{T} has a long and interesting history.", "Many people enjoy learning about {t}.",
    "There is always something new to notice about {t}.", "Some details about {t} surprise even experts.",
    "Talking about {t} is a good way to start a conversation.", "You can learn a lot about {t} from a good book.",
]


def template_content(topic: str, rng: random.Random) -> str:
    facts = rng.sample(TEMPLATE_FACTS, 4)
    return " ".join(f.format(t=topic, T=topic[0].upper() + topic[1:]) for f in facts)


def undo_one(text: str, ids: list[str], kwargs: list[dict], rng: random.Random) -> str | None:
    """A template violation of one instruction, for pairs where every sample passed."""
    iid = rng.choice(ids)
    if iid == LOWER:
        return text[:1].upper() + text[1:] if text[:1].isalpha() else "The " + text
    if iid == CAPITAL:
        return text.lower()
    if iid == NO_COMMA:
        words = text.split(" ")
        return " ".join(words[:2]) + ", " + " ".join(words[2:]) if len(words) > 3 else None
    if iid == END:
        return text + " More could be said."
    if iid == QUOTE:
        return text.strip().strip('"')
    if iid == BULLETS:
        return text + "\n* One more point."
    return None


def judge(text: str, rec: dict) -> bool:
    return bool(text.strip()) and all(check_record(text, rec["instruction_id_list"], rec["kwargs"]))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


class Sampler:
    def __init__(self, skip: bool):
        self.skip = skip
        if skip:
            return
        from pipeline.config import ModelConfig
        from pipeline.models import load_policy, resolve_precision

        self.precision = resolve_precision(ModelConfig())
        self.model, self.tok = load_policy("smollm2-135m-instruct", ModelConfig(), self.precision)

    def __call__(self, prompts: list[str], do_sample: bool, max_new_tokens: int, desc: str,
                 repetition_penalty: float = 1.0) -> list[str]:
        """Generate in chunks, caching each chunk under ~/.cache so an interrupted run resumes."""
        import hashlib

        import torch

        from pipeline.generation import generate
        from pipeline.models import cache_dir

        spec = [prompts, do_sample, max_new_tokens] + ([repetition_penalty] if repetition_penalty != 1.0 else [])
        key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
        cache = cache_dir() / "data-gen" / key
        cache.mkdir(parents=True, exist_ok=True)
        texts: list[str] = []
        chunk = 64
        for start in range(0, len(prompts), chunk):
            f = cache / f"{start:06d}.json"
            if f.exists():
                texts += json.loads(f.read_text())
                continue
            torch.manual_seed(start)
            g = generate(self.model, self.tok, prompts[start:start + chunk], max_new_tokens=max_new_tokens,
                         batch_size=32, do_sample=do_sample, temperature=0.9, repetition_penalty=repetition_penalty,
                         autocast=self.precision.autocast_ctx(),
                         progress=True, desc=f"{desc} {start}/{len(prompts)}")
            f.write_text(json.dumps(g.texts))
            texts += g.texts
        return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "data" / "constraints"))
    ap.add_argument("--heldout-out", default=str(ROOT / "eval" / "constraints"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sft", type=int, default=560)
    ap.add_argument("--n-prefs", type=int, default=320)
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--n-heldout", type=int, default=100)
    ap.add_argument("--samples", type=int, default=2, help="samples per preference prompt")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--sft-content", choices=["bare", "instructed"], default="bare",
                    help="SFT content: the model's greedy answer to the bare task (default; the committed files), or "
                         "to the prompt WITH its instructions (each demonstration is then a minimal edit of what the "
                         "model already does; measured: held-out pass 0.21, the same as bare)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out, held_out = Path(args.out), Path(args.heldout_out)
    sample = Sampler(args.skip_model)

    # 1. Prompts for every split, drawn without repeating a prompt text.
    seen: set[str] = set()

    def draw(n: int, heldout: bool, gen: random.Random) -> list[dict]:
        counts = {i: 0 for i in IDS}
        rows = []
        while len(rows) < n:
            r = make_prompt(gen, heldout, counts)
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                rows.append(r)
        return rows

    # The held-out prompts come from their own generator, so growing the training pools never
    # changes the held-out set.
    held_p = draw(args.n_heldout, True, random.Random(f"heldout-{args.seed}"))
    sft_p, pref_p, rl_p = (draw(args.n_sft, False, rng), draw(args.n_prefs, False, rng),
                           draw(args.n_prompts, False, rng))

    # 2. SFT: the model's own greedy answer (to the instructed prompt, or to the bare task), made to satisfy
    #    the instructions.
    if args.skip_model:
        plain = {}
    elif args.sft_content == "bare":
        tasks = sorted({r["task"] for r in sft_p})
        plain = dict(zip(tasks, sample(tasks, False, CONTENT_TOKENS, "plain answers", CONTENT_REPETITION_PENALTY)))
    else:
        prompts = [r["prompt"] for r in sft_p]
        plain = dict(zip(prompts, sample(prompts, False, CONTENT_TOKENS, "instructed answers",
                                         CONTENT_REPETITION_PENALTY)))
    content_key = "task" if args.sft_content == "bare" else "prompt"
    sft_rows = []
    for r in sft_p:
        base = whole_sentences(plain.get(r[content_key], ""), **content_limits(r)) or template_content(r["topic"], rng)
        if len(base.split()) < 25:
            base = base + " " + template_content(r["topic"], rng)
        try:
            text = apply_constraints(base, r["instruction_id_list"], r["kwargs"])
        except ValueError:
            continue
        if judge(text, r):
            sft_rows.append({"prompt": r["prompt"], "completion": text,
                             "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]})

    # 3. Preference pairs from real samples judged by the checkers.
    k = args.samples
    flat = [r["prompt"] for r in pref_p for _ in range(k)]
    samples = sample(flat, True, 112, "preference samples") if not args.skip_model else [
        template_content(r["topic"], rng) for r in pref_p for _ in range(k)]
    prefs, sources = [], {"chosen_sample": 0, "chosen_repaired": 0, "rejected_sample": 0, "rejected_template": 0}
    ranked = []
    for j, r in enumerate(pref_p):
        outs = [s.strip() for s in samples[j * k:(j + 1) * k] if s.strip()]
        good = [s for s in outs if judge(s, r)]
        bad = [s for s in outs if not judge(s, r)]
        chosen, c_src = (good[0], "sample") if good else (None, "repaired")
        if chosen is None:
            for s in outs + [template_content(r["topic"], rng)]:
                try:
                    fixed = apply_constraints(whole_sentences(s, **content_limits(r)) or s, r["instruction_id_list"],
                                              r["kwargs"])
                except ValueError:
                    continue
                if judge(fixed, r):
                    chosen = fixed
                    break
        if chosen is None:
            continue
        rejected, r_src = (bad[0], "sample") if bad else (undo_one(chosen, r["instruction_id_list"], r["kwargs"], rng),
                                                          "template")
        if rejected is None or judge(rejected, r) or rejected == chosen:
            continue
        sources[f"chosen_{c_src}"] += 1
        sources[f"rejected_{r_src}"] += 1
        prefs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected,
                      "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"],
                      "chosen_source": c_src, "rejected_source": r_src})
        # A ranked list: rank = number of instructions failed (ties share a rank).
        candidates = list(dict.fromkeys([chosen] + outs))
        if len(ranked) < 20 and len(candidates) >= 3:
            fails = [sum(not ok for ok in check_record(s, r["instruction_id_list"], r["kwargs"])) for s in candidates]
            if len(set(fails)) > 1:
                ranked.append({"prompt": r["prompt"], "responses": candidates, "ranks": fails})

    # 4. RL and held-out prompts (prompt-only records).
    def prompt_rows(rows: list[dict], prefix: str) -> list[dict]:
        return [{"id": f"{prefix}-{i:04d}", "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
                 "kwargs": r["kwargs"]} for i, r in enumerate(rows)]

    # IFEval is for evaluation only: no training prompt may carry one (checked before anything is written).
    hits = find_ifeval_prompts([r["prompt"] for r in sft_rows + prefs + ranked + rl_p])
    assert not hits, f"IFEval prompts in the training data (row, IFEval key): {hits[:5]}"
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "prefs.jsonl", prefs)
    write_jsonl(out / "prefs_ranked.jsonl", ranked)
    write_jsonl(out / "prompts.jsonl", prompt_rows(rl_p, "rl"))
    write_jsonl(held_out / "heldout.jsonl", prompt_rows(held_p, "heldout"))

    # 5. The public IFEval subset, for evaluation only.
    shared = ROOT.parent / "shared" / "ifeval" / "subset_supported.jsonl"
    if shared.exists():
        (ROOT / "eval" / "ifeval").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared, ROOT / "eval" / "ifeval" / "subset_supported.jsonl")

    check_disjoint(out, held_out)
    stats = {"sft": len(sft_rows), "prefs": len(prefs), "prefs_ranked": len(ranked), "prompts": len(rl_p),
             "heldout": len(held_p), **sources}
    print(json.dumps(stats, indent=1))


def training_text(out: Path) -> str:
    """All training PROMPTS, lower-cased (responses are model text and may mention anything)."""
    parts = []
    for name in ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl"):
        p = out / name
        if p.exists():
            parts += [json.loads(line)["prompt"] for line in p.read_text(encoding="utf-8").splitlines() if line]
    return "\n".join(parts).lower()


def check_disjoint(out: Path, held_out: Path) -> None:
    """No held-out topic, framing or phrasing, and no IFEval prompt, occurs in any training prompt."""
    text = training_text(out)
    for t in HELDOUT_TOPICS:
        assert t.lower() not in text, f"held-out topic {t!r} occurs in training data"
    for iid, (_, held) in PHRASINGS.items():
        for h in held:
            stem = h.split("{")[0].strip().lower()
            assert stem[:30] not in text, f"held-out phrasing {h!r} occurs in training data"
    for task in HELDOUT_TASKS:
        assert task.split("{")[0].strip().lower() not in text, f"held-out framing {task!r} in training data"
    # The opening ten words of every one of IFEval's 541 prompts (pipeline/ifeval.py, DataError on a hit).
    assert_no_ifeval_prompts([out / n for n in ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl")])
    ifeval = ROOT / "eval" / "ifeval" / "subset_supported.jsonl"
    if ifeval.exists():
        for line in ifeval.read_text(encoding="utf-8").splitlines():
            p = json.loads(line)["prompt"].lower()
            assert p[:80] not in text, "an IFEval prompt occurs in training data"


if __name__ == "__main__":
    main()
