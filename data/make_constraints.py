"""Make the built-in instruction-following task for all 25 IFEval instruction ids: SFT demonstrations,
preference pairs, RL prompts, general prompts (no instructions) and held-out prompts, IFEval style
(`prompt`, `instruction_id_list`, `kwargs`), judged by `pipeline.checkers` (lm-evaluation-harness's
IFEval verifiers; docs/ifeval.md).

    python data/make_constraints.py                  # model sampling (cached under ~/.cache); see data/README.md
    python data/make_constraints.py --skip-model     # template content only, for debugging and tests
    python data/make_constraints.py --skip-model --out /tmp/x   # writes /tmp/x/*.jsonl and /tmp/x/heldout/

Held-out preference pairs (`prefs_heldout.jsonl`, next to heldout.jsonl; issue #22) are built from the
held-out prompts by the same procedure as the training pairs, with a generator of their own.

Deterministic for a seed. A prompt is a base task (a kind of writing x a topic) followed by 1 (~45 %),
2 (~40 %) or 3 (~15 %) instructions, the least-used id drawn first so the ids stay balanced, never two
that conflict (the registry's `INSTRUCTION_CONFLICTS`, `checkers.INCOMPATIBLE_PAIRS` when present, and
`PROJECT_CONFLICTS` below). Each instruction's kwargs are drawn by the registry itself
(`INSTRUCTION_DICT[id](id).build_description(**overrides)`, then `get_instruction_args()`), with overrides
that keep it feasible in about 90 words. Its text is the registry's own description (about 40 % in
training) or one of the project's phrasings written from the same kwargs.

Two disjoint pools: the training files (sft, prefs, prompts, prompts_general) draw tasks, topics and
phrasings from TRAIN_*, the held-out split only from HELDOUT_*, so the held-out numbers measure
generalisation to wordings and topics never trained on. The script asserts the disjointness, that every
one of the 25 ids occurs at least `--min-heldout-per-id` times in the held-out split, and that no training
prompt carries the opening of an IFEval prompt (`pipeline.ifeval.find_ifeval_prompts`).

Content: the default model's own answers to the bare task (no instruction), cut to whole sentences
without the greedy loops, then made to satisfy the instructions with `checkers.apply_constraints`; only
rows that pass the harness's strict check are kept (SFT). Instruction ids without a fixer
(`checkers.FIXABLE_IDS`, read at run time) get no SFT rows or pairs, but do appear in the RL and held-out
prompts. Preference pairs: chosen follows more instructions than rejected; chosen is a model sample that
passes (or a repaired one), rejected a failing sample, else a sample repaired with one instruction left
out, else template text; a rejected that is the chosen cut short or padded (one a prefix of the other)
is never used, so the reward model cannot learn length alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import checkers  # noqa: E402
from pipeline.checkers import apply_constraints, check_record, validate_record  # noqa: E402
from pipeline.data import DataError  # noqa: E402
from pipeline.format_probe import format_negative_pairs  # noqa: E402
from pipeline.ifeval import assert_no_ifeval_prompts, find_ifeval_prompts, harness  # noqa: E402
from pipeline.utils import atomic_write_text  # noqa: E402

# The 25 ids (lm-evaluation-harness instructions_registry.INSTRUCTION_DICT).
LOWER, CAPITAL, NO_COMMA = "change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma"
WORDS, END, KEYWORDS = "length_constraints:number_words", "startend:end_checker", "keywords:existence"
BULLETS, QUOTE = "detectable_format:number_bullet_lists", "startend:quotation"
FREQUENCY, FORBIDDEN = "keywords:frequency", "keywords:forbidden_words"
LETTER, LANGUAGE = "keywords:letter_frequency", "language:response_language"
SENTENCES, PARAGRAPHS = "length_constraints:number_sentences", "length_constraints:number_paragraphs"
FIRST_WORD = "length_constraints:nth_paragraph_first_word"
PLACEHOLDERS, POSTSCRIPT = "detectable_content:number_placeholders", "detectable_content:postscript"
CONSTRAINED, HIGHLIGHTS = "detectable_format:constrained_response", "detectable_format:number_highlighted_sections"
SECTIONS, JSON, TITLE = "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title"
TWO_RESPONSES, REPEAT = "combination:two_responses", "combination:repeat_prompt"
CAPITAL_WORDS = "change_case:capital_word_frequency"

# How many instructions a prompt gets: 1 (45 %), 2 (40 %), 3 (15 %).
N_INSTRUCTIONS = ((1, 0.45), (2, 0.40), (3, 0.15))
# Share of training instructions written in the registry's own words (the rest: TRAIN phrasings).
REGISTRY_TEXT_SHARE = 0.4
# Pairs the registry allows but these prompts make hard to satisfy together: a bulleted answer's sentence
# count depends on whether each bullet ends with a full stop, and a paragraph that must open with an English
# word fights an answer in another language.
PROJECT_CONFLICTS = [{SENTENCES, BULLETS}, {LANGUAGE, FIRST_WORD}]
# Languages for response_language: widely written ones a small model has seen (the registry's 30
# include scripts it has barely seen, which would make the instruction a dead end for RL).
LANGUAGES = ("es", "fr", "de", "it", "pt", "ru", "hi", "ja")
# Letters for keywords:letter_frequency: rare ones for "less than" (feasible in 90 words), any for "at least".
RARE_LETTERS, COMMON_LETTERS = "qzxj", "abcdefghiklmnoprstuwy"

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

# Base tasks by kind; none has a comma (a repeated request must stay comma-free next to no_comma), each fits
# a 60-90 word answer. The held-out kinds and wordings never occur in training.
TRAIN_TASKS = [
    # explanations
    "Explain {t} to a child.", "Explain why {t} matters.", "Explain in simple words what makes {t} special.",
    "Tell me a few facts about {t}.", "Describe {t}.", "What is interesting about {t}?",
    # emails and letters
    "Write a short email to a friend about {t}.", "Write a short email inviting a coworker to a talk on {t}.",
    "Write a short letter to your grandmother about {t}.", "Write a letter to the editor of a local paper about {t}.",
    # stories and poems
    "Write a short story about {t}.", "Write a very short bedtime story featuring {t}.",
    "Write a short poem about {t}.", "Write a four-line rhyme about {t}.", "Write a haiku-like short poem about {t}.",
    # product descriptions, reviews, ads
    "Write a product description for a picture book about {t}.",
    "Write a short product description for a calendar with photos of {t}.",
    "Write a short review of a documentary about {t}.", "Write a short advertisement for a class about {t}.",
    "Write a short advertisement for {t}.",
    # advice, plans, how-tos
    "Give some tips about {t}.", "Give some advice to someone who wants to learn about {t}.",
    "Make a simple one-day plan for a family interested in {t}.", "Plan a short school trip about {t}.",
    "Write a short how-to guide for learning about {t}.", "Create a short lesson plan about {t}.",
    # dialogues, summaries, riddles, opinions
    "Write a short dialogue between two friends about {t}.", "Summarize the main facts about {t}.",
    "Give a brief overview of {t}.", "Write a riddle whose answer is {t}.", "Write a riddle-style description of {t}.",
    "Share your thoughts on {t}.", "Share your opinion on {t}.", "Why do people like {t}?",
    # cover letters, speeches, posts, reports
    "Write a short cover letter for a job that involves {t}.", "Write a short speech about {t}.",
    "Write a short blog post about {t}.", "Write a social media post about {t}.",
    "Write a short news report about {t}.", "Write an encyclopedia-style entry on {t}.",
    "Write a few sentences for a travel guide about {t}.", "Write a short note to a friend about {t}.",
]
HELDOUT_TASKS = [
    "Compose a product review of {t}.", "Draft a museum placard describing {t}.",
    "Pretend you are a tour guide and introduce {t}.", "Write a diary entry about {t}.",
    "Summarize what a beginner should know about {t}.", "Draft a job posting for someone who looks after {t}.",
    "Write the script of a short radio interview about {t}.", "Compose a limerick about {t}.",
    "Text a sibling about {t}.", "Jot down a field note about {t}.",
    "Draft a toast for a party in honour of {t}.", "Prepare a postcard message from a holiday spent near {t}.",
]
# Yes/no questions, the base task for constrained_response (its answer is one of three fixed sentences).
TRAIN_QUESTIONS = [
    "Is {t} worth learning about?", "Would {t} make a good topic for a school project?",
    "Should every child learn about {t}?", "Is {t} more interesting than most people think?",
    "Can {t} teach us something useful?", "Would you enjoy a whole day devoted to {t}?",
]
HELDOUT_QUESTIONS = [
    "Do you reckon {t} will still matter in a hundred years?", "Would you recommend {t} to a bored teenager?",
    "Does {t} deserve a festival of its own?",
]

# Instruction phrasings per id: (training pool, held-out pool), written from the same kwargs as the registry's
# text. Varied register (plain, terse, polite, indirect, informal); the held-out wordings never occur in training.
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

# The other 17 ids. Placeholders are filled from the kwargs by `fill_values`.
PHRASINGS.update({
    FREQUENCY: ([
        'Use the word "{keyword}" {relation} {frequency} times.',
        "The word {keyword} should appear {relation} {frequency} times in your reply.",
        'Make sure "{keyword}" shows up {relation} {frequency} times.',
        "pls use '{keyword}' {relation} {frequency} times",
        'Could you use the word "{keyword}" {relation} {frequency} times?',
        'Word rule: "{keyword}" appears {relation} {frequency} times.',
    ], [
        'Tally the occurrences of "{keyword}" in your text: there must be {relation} {frequency}.',
        'I am keeping score of how often "{keyword}" turns up; it has to be {relation} {frequency} times.',
    ]),
    FORBIDDEN: ([
        "Do not use the words {forbidden}.", "Avoid the words {forbidden} entirely.",
        "Never say {forbidden} in your answer.", "Please keep {forbidden} out of your reply.",
        "banned words: {forbidden}", "Your response must not contain {forbidden}.",
    ], [
        "Steer clear of {forbidden}; none of them may show up.",
        "A reply that mentions {forbidden} is disqualified.",
    ]),
    LETTER: ([
        "The letter {letter} should appear {let_relation} {let_frequency} times in your response.",
        'Use the letter "{letter}" {let_relation} {let_frequency} times.',
        "Make sure the letter {letter} occurs {let_relation} {let_frequency} times.",
        "letter check: '{letter}' {let_relation} {let_frequency} times",
        "Could you write it so the letter {letter} shows up {let_relation} {let_frequency} times?",
    ], [
        "Count every {letter} you type: the total has to be {let_relation} {let_frequency}.",
        "Mind your {letter}s, since the whole reply may hold {let_relation} {let_frequency} of them.",
    ]),
    LANGUAGE: ([
        "Respond in {language} only.", "Write your whole answer in {language}.",
        "Please reply in {language} and use no other language.", "{language} only, please.",
        "Answer entirely in the {language} language.",
    ], [
        "Every word you write must be {language}; nothing in any other tongue.",
        "Switch over to {language} for the entire reply.",
    ]),
    SENTENCES: ([
        "Use {relation} {num_sentences} sentences.", "Your answer should have {relation} {num_sentences} sentences.",
        "Write {relation} {num_sentences} sentences in total.", "Keep it to {relation} {num_sentences} sentences, please.",
        "sentence count: {relation} {num_sentences}", "Could you answer in {relation} {num_sentences} sentences?",
    ], [
        "Measured in sentences, the reply should come to {relation} {num_sentences}.",
        "I will count full stops, and {relation} {num_sentences} sentences is the rule.",
    ]),
    PARAGRAPHS: ([
        "Write exactly {num_paragraphs} paragraphs separated by the markdown divider ***.",
        "Use {num_paragraphs} paragraphs with *** between them.",
        "Split your answer into {num_paragraphs} paragraphs and put *** between paragraphs.",
        "Please give {num_paragraphs} paragraphs divided by ***.", "{num_paragraphs} paragraphs, separated with ***.",
    ], [
        "Break the text into {num_paragraphs} blocks and mark each break with three asterisks (***).",
        "Between consecutive paragraphs place ***; there must be {num_paragraphs} paragraphs overall.",
    ]),
    FIRST_WORD: ([
        'Write {num_paragraphs} paragraphs separated by blank lines; the {nth_ord} paragraph must start with '
        'the word "{first_word}".',
        'Use {num_paragraphs} paragraphs (separated by an empty line) and begin paragraph {nth_paragraph} with '
        '"{first_word}".',
        "Give {num_paragraphs} paragraphs split by two new lines. Start the {nth_ord} one with the word {first_word}.",
        "Please answer in {num_paragraphs} paragraphs with a blank line between them, and open paragraph "
        '{nth_paragraph} with "{first_word}".',
    ], [
        'Lay the answer out as {num_paragraphs} blank-line-separated paragraphs whose {nth_ord} opens with the '
        'word "{first_word}".',
        'Compose {num_paragraphs} paragraphs with an empty line after each; "{first_word}" has to be the first '
        "word of paragraph number {nth_paragraph}.",
    ]),
    PLACEHOLDERS: ([
        "Include at least {num_placeholders} placeholders in square brackets, like [name].",
        "Use {num_placeholders} or more placeholders written in square brackets, such as [address].",
        "Leave at least {num_placeholders} blanks in square brackets (e.g. [date]) for me to fill in.",
        "add at least {num_placeholders} [placeholder]-style fields",
        "Please put at least {num_placeholders} bracketed placeholders like [city] in the text.",
    ], [
        "Sprinkle in at least {num_placeholders} fill-in spots in square brackets, for example [recipient].",
        "There should be no fewer than {num_placeholders} bracketed gaps such as [time] left in the text.",
    ]),
    POSTSCRIPT: ([
        "End with a postscript that starts with {postscript_marker}", 'Add a postscript beginning with '
        '"{postscript_marker}" at the end.', "Please include a {postscript_marker} note after the main text.",
        "After your answer add a line starting with {postscript_marker}", "Finish with a postscript ({postscript_marker}).",
    ], [
        "Tack on an afterthought introduced by {postscript_marker} once you are done.",
        "Below the main reply leave a short note opening with {postscript_marker}",
    ]),
    CONSTRAINED: ([
        'Answer with one of these: "My answer is yes.", "My answer is no." or "My answer is maybe."',
        'Reply using exactly one of the options "My answer is yes." / "My answer is no." / "My answer is maybe."',
        "Choose one: My answer is yes. My answer is no. My answer is maybe.",
        'Please respond with "My answer is yes.", "My answer is no.", or "My answer is maybe."',
    ], [
        'Pick your verdict from "My answer is yes.", "My answer is no." and "My answer is maybe." and give it '
        "verbatim.",
        'The only acceptable replies are "My answer is yes.", "My answer is no." and "My answer is maybe."',
    ]),
    HIGHLIGHTS: ([
        "Highlight at least {num_highlights} parts of your answer with markdown, like *this part*.",
        "Mark at least {num_highlights} sections in *italics* using single asterisks.",
        "Use markdown to highlight {num_highlights} or more phrases, e.g. *important*.",
        "please *highlight* at least {num_highlights} bits",
        "Emphasize at least {num_highlights} key phrases by wrapping them in asterisks.",
    ], [
        "Put asterisks around at least {num_highlights} passages so they stand out, as in *a key idea*.",
        "Draw attention to {num_highlights} or more phrases by enclosing each in single asterisks.",
    ]),
    SECTIONS: ([
        'Divide your answer into {num_sections} sections, each starting with "{section_spliter} X" '
        "(e.g. {section_spliter} 1).",
        "Use {num_sections} sections labelled {section_spliter} 1, {section_spliter} 2 and so on.",
        "Organise the reply as {num_sections} parts, marking each one with {section_spliter} followed by its number.",
        "{num_sections} sections please, headed '{section_spliter} 1', '{section_spliter} 2', ...",
    ], [
        "Split what you write into {num_sections} parts whose headers read {section_spliter} 1 through "
        "{section_spliter} {num_sections}.",
        'Give each of the {num_sections} portions of the answer a heading of the form "{section_spliter} N".',
    ]),
    JSON: ([
        "Format your entire answer as JSON.", "Wrap the whole output in JSON; markdown ticks like ``` are fine.",
        "Return your response as valid JSON.", "json only please", "Please give the answer as a JSON object.",
    ], [
        "Produce nothing but a parseable JSON document.",
        "Make the reply machine-readable: the whole thing must be JSON.",
    ]),
    TITLE: ([
        "Give your answer a title in double angular brackets, like <<my title>>.",
        "Start with a title wrapped in << and >>.", "Include a title such as <<a day out>>.",
        "Put a title in <<double angle brackets>> at the top.", "title it <<like this>>",
    ], [
        "Head the text with a name enclosed in << >>, for instance <<morning notes>>.",
        "Somewhere near the top there should be a heading set between << and >>.",
    ]),
    TWO_RESPONSES: ([
        "Give two different responses separated by six asterisks: ******.",
        "Write two different answers and put ****** between them.",
        "Offer two versions, separated by a line of ******.", "two answers pls, split with ******",
        "Please provide two distinct responses, with ****** as the only separator.",
    ], [
        "Draft a pair of alternative replies and divide them with the string ******.",
        "I want two takes on this; the divider between them must be ******.",
    ]),
    REPEAT: ([
        "First repeat the request above word for word, then answer it.",
        "Before answering, copy my request exactly as written, then give your answer.",
        "Start by repeating the request without any change, then respond.",
        "repeat my request first (word for word), then answer",
        "Please echo the request back verbatim before you answer it.",
    ], [
        "Quote my question back to me exactly, with nothing before it, and only then reply.",
        "Your reply has to open with an exact copy of what I asked, followed by the answer.",
    ]),
    CAPITAL_WORDS: ([
        "Use {capital_relation} {capital_frequency} words written in ALL CAPITALS.",
        "Words in all capital letters should appear {capital_relation} {capital_frequency} times.",
        "Include {capital_relation} {capital_frequency} fully capitalized words.",
        "all-caps words: {capital_relation} {capital_frequency}",
        "Please write {capital_relation} {capital_frequency} words entirely in uppercase.",
    ], [
        "The number of shouted words (every letter upper case) must be {capital_relation} {capital_frequency}.",
        "Count the fully upper-case words you use and keep that count {capital_relation} {capital_frequency}.",
    ]),
})
# End phrases: the registry's own two ("Any other questions?", "Is there anything else I can help with?")
# or these in training; only these in the held-out split. None has a comma (no_comma may come with it).
TRAIN_END_PHRASES = ["Let me know if you have additional questions.", "That is all for today.", "Thanks for reading.",
                     "Have a great day.", "I hope this helps."]
HELDOUT_END_PHRASES = ["See you next time.", "The end.", "That wraps it up."]
ORDINALS = ["first", "second", "third", "fourth", "fifth"]

# SFT content: greedy, long enough for "at least 60 words", with HF's repetition penalty so that the
# small model's greedy loops do not become demonstrations (1.2 measured: no loops, on-topic prose).
CONTENT_TOKENS = 160
CONTENT_REPETITION_PENALTY = 1.2


# --------------------------------------------------------------------------------------------
# Instruction ids, conflicts, kwargs and phrasings
# --------------------------------------------------------------------------------------------


def all_ids() -> list[str]:
    """The registry's 25 ids, sorted."""
    return sorted(harness().registry.INSTRUCTION_DICT)


def conflict_pairs() -> set[frozenset]:
    """Unordered pairs never drawn together: the registry's `INSTRUCTION_CONFLICTS` (made symmetric, as
    its own `conflict_make` would), `checkers.INCOMPATIBLE_PAIRS` when present, and PROJECT_CONFLICTS."""
    pairs: set[frozenset] = set()
    for a, others in getattr(harness().registry, "INSTRUCTION_CONFLICTS", {}).items():
        pairs |= {frozenset((a, b)) for b in others if b != a}
    for pair in list(getattr(checkers, "INCOMPATIBLE_PAIRS", ())) + PROJECT_CONFLICTS:
        pair = frozenset(pair)
        if len(pair) == 2:
            pairs.add(pair)
    return pairs


@contextlib.contextmanager
def seeded_global_random(gen: random.Random) -> Iterator[None]:
    """The registry draws kwargs with Python's global `random`: seed it from `gen` (restored after), so the
    data stays a function of the script's seed."""
    state = random.getstate()
    random.seed(gen.getrandbits(64))
    try:
        yield
    finally:
        random.setstate(state)


def overrides(iid: str, gen: random.Random, heldout: bool, task: str) -> dict:
    """kwargs given to `build_description` so the instruction is feasible in a ~90-word answer; the
    registry draws the rest."""
    if iid == WORDS:
        if gen.random() < 0.5:
            return {"relation": "less than", "num_words": gen.choice(range(40, 121, 10))}
        return {"relation": "at least", "num_words": gen.choice(range(30, 61, 10))}
    if iid == SENTENCES:
        return {"num_sentences": gen.randint(2, 6)}
    if iid == PARAGRAPHS:
        return {"num_paragraphs": gen.randint(2, 4)}
    if iid == FIRST_WORD:
        n = gen.randint(2, 4)
        return {"num_paragraphs": n, "nth_paragraph": gen.randint(1, n)}
    if iid == SECTIONS:
        return {"num_sections": gen.randint(2, 4)}
    if iid == HIGHLIGHTS:
        return {"num_highlights": gen.randint(1, 3)}
    if iid == PLACEHOLDERS:
        return {"num_placeholders": gen.randint(1, 3)}
    if iid == BULLETS:
        return {"num_bullets": gen.randint(2, 5)}
    if iid == LETTER:
        if gen.random() < 0.5:
            return {"letter": gen.choice(RARE_LETTERS), "let_relation": "less than", "let_frequency": gen.randint(2, 4)}
        return {"letter": gen.choice(COMMON_LETTERS), "let_relation": "at least", "let_frequency": gen.randint(3, 10)}
    if iid == CAPITAL_WORDS:
        return {"capital_frequency": gen.randint(2, 6)}
    if iid == LANGUAGE:
        return {"language": gen.choice(LANGUAGES)}
    if iid == END:
        if heldout:
            return {"end_phrase": gen.choice(HELDOUT_END_PHRASES)}
        return {} if gen.random() < 0.5 else {"end_phrase": gen.choice(TRAIN_END_PHRASES)}
    if iid == REPEAT:
        return {"prompt_to_repeat": task}
    return {}


def registry_draw(iid: str, gen: random.Random, heldout: bool, task: str) -> tuple[dict, str]:
    """(kwargs, the registry's own instruction text) for one instruction."""
    inst = harness().registry.INSTRUCTION_DICT[iid](iid)
    with seeded_global_random(gen):
        text = inst.build_description(**overrides(iid, gen, heldout, task))
        args = inst.get_instruction_args() or {}
    return {k: v for k, v in args.items() if v is not None}, text


def _quoted(words: list[str]) -> str:
    q = [f'"{w}"' for w in words]
    return " and ".join(q) if len(q) <= 2 else ", ".join(q[:-1]) + " and " + q[-1]


def fill_values(kwargs: dict) -> dict:
    """Placeholders for a phrasing: the kwargs themselves plus a few spelled-out forms."""
    fill = dict(kwargs)
    if "keywords" in kwargs:
        fill["kw"] = _quoted(kwargs["keywords"])
    if "forbidden_words" in kwargs:
        fill["forbidden"] = _quoted(kwargs["forbidden_words"])
    if "language" in kwargs:
        fill["language"] = harness().instructions_util.LANGUAGE_CODES[kwargs["language"]]
    if "nth_paragraph" in kwargs:
        fill["nth_ord"] = ORDINALS[kwargs["nth_paragraph"] - 1]
    return fill


def phrase(iid: str, kwargs: dict, registry_text: str, gen: random.Random, heldout: bool) -> tuple[str, str]:
    """(instruction text, its source: "registry" / "train" / "heldout")."""
    if heldout:
        return gen.choice(PHRASINGS[iid][1]).format(**fill_values(kwargs)), "heldout"
    if gen.random() < REGISTRY_TEXT_SHARE:
        return registry_text, "registry"
    return gen.choice(PHRASINGS[iid][0]).format(**fill_values(kwargs)), "train"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def feasible(task: str, ids: list[str], kwargs: list[dict]) -> bool:
    """Kwargs of different instructions that contradict each other or the task: a forbidden word that the
    task or another instruction needs, a "less than N" letter that required words already use N times."""
    kw = dict(zip(ids, kwargs))
    required = " ".join([" ".join(kw.get(KEYWORDS, {}).get("keywords", [])), kw.get(END, {}).get("end_phrase", ""),
                         kw.get(FIRST_WORD, {}).get("first_word", ""), kw.get(POSTSCRIPT, {}).get("postscript_marker", ""),
                         kw.get(FREQUENCY, {}).get("keyword", "") if kw.get(FREQUENCY, {}).get("relation") == "at least"
                         else "", task if REPEAT in kw else ""])
    if FORBIDDEN in kw:
        banned = {w.lower() for w in kw[FORBIDDEN]["forbidden_words"]}
        if banned & (_words(required) | _words(task)):
            return False
    if FREQUENCY in kw and kw[FREQUENCY]["relation"] == "less than":
        if kw[FREQUENCY]["keyword"].lower() in _words(required) | _words(task):
            return False
    if LETTER in kw and kw[LETTER]["let_relation"] == "less than":
        if required.lower().count(kw[LETTER]["letter"].lower()) >= kw[LETTER]["let_frequency"]:
            return False
    return True


def pick_count(gen: random.Random) -> int:
    x, acc = gen.random(), 0.0
    for n, p in N_INSTRUCTIONS:
        acc += p
        if x < acc:
            return n
    return N_INSTRUCTIONS[-1][0]


def make_prompt(gen: random.Random, heldout: bool, counts: Counter, pool: list[str],
                conflicts: set[frozenset]) -> dict:
    """One prompt record: a base task and 1-3 compatible instructions from `pool`, least-used id first.
    Does not update `counts` (the caller does, for the rows it keeps)."""
    for _ in range(50):
        topic = gen.choice(HELDOUT_TOPICS if heldout else TRAIN_TOPICS)
        first = min(pool, key=lambda i: (counts[i], gen.random()))
        ids = [first]
        for _ in range(pick_count(gen) - 1):
            options = [i for i in pool if i not in ids and not any(frozenset((i, j)) in conflicts for j in ids)]
            if not options:
                break
            ids.append(min(options, key=lambda i: (counts[i], gen.random())))
        gen.shuffle(ids)
        if REPEAT in ids:  # the request to repeat comes first, the instruction to repeat it last
            ids.remove(REPEAT)
            ids.append(REPEAT)
        if CONSTRAINED in ids:
            task = gen.choice(HELDOUT_QUESTIONS if heldout else TRAIN_QUESTIONS).format(t=topic)
        else:
            task = gen.choice(HELDOUT_TASKS if heldout else TRAIN_TASKS).format(t=topic)
        task = task[0].upper() + task[1:]
        drawn = [registry_draw(i, gen, heldout, task) for i in ids]
        kwargs = [k for k, _ in drawn]
        if not feasible(task, ids, kwargs):
            continue
        texts = [phrase(i, k, t, gen, heldout) for i, (k, t) in zip(ids, drawn)]
        parts = [task] + [t for t, _ in texts]
        if REPEAT in ids:  # IFEval's layout: the instruction to repeat on a line of its own after the request
            prompt = " ".join(parts[:-1]) + "\n" + parts[-1]
        else:
            prompt = " ".join(parts)
        rec = {"prompt": prompt, "task": task, "topic": topic, "instruction_id_list": ids, "kwargs": kwargs,
               "sources": [s for _, s in texts]}
        validate_record(rec, where=f"generated prompt {prompt[:60]!r}")
        return rec
    raise RuntimeError(f"no feasible prompt for {first!r} in 50 draws")  # a bug in the pools, not user input


def leaks_heldout(text: str) -> str | None:
    """The held-out topic, task framing or phrasing that `text` contains, if any."""
    low = text.lower()
    for t in HELDOUT_TOPICS:
        if t.lower() in low:
            return f"held-out topic {t!r}"
    for task in HELDOUT_TASKS + HELDOUT_QUESTIONS:
        stem = task.split("{")[0].strip().lower()
        if len(stem) >= 8 and stem in low:
            return f"held-out task framing {task!r}"
    for iid, (_, held) in PHRASINGS.items():
        for h in held:
            stem = h.split("{")[0].strip().lower()[:30]
            if len(stem) >= 12 and stem in low:
                return f"held-out phrasing {h!r} of {iid}"
    return None


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


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

    N + 15 words for "at least N words"; at least one sentence per bullet, paragraph or section, and the
    sentences an "at least N sentences" asks for, so the fixers have whole sentences to arrange.
    """
    pairs = list(zip(rec["instruction_id_list"], rec["kwargs"]))
    at_least = [kw["num_words"] for i, kw in pairs if i == WORDS and kw["relation"] == "at least"]
    units = [kw[k] for i, kw in pairs for k in ("num_bullets", "num_paragraphs", "num_sections") if k in kw]
    units += [kw["num_sentences"] for i, kw in pairs if i == SENTENCES and kw["relation"] == "at least"]
    if at_least:
        return {"max_sentences": max([12] + units), "max_words": max(at_least) + 15}
    return {"max_sentences": max([4] + units), "max_words": 60}


TEMPLATE_FACTS = [
    "{T} has a long and interesting history.", "Many people enjoy learning about {t}.",
    "There is always something new to notice about {t}.", "Some details about {t} surprise even experts.",
    "Talking about {t} is a good way to start a conversation.", "You can learn a lot about {t} from a good book.",
    "Children often ask questions about {t}.", "A short walk can teach you something about {t}.",
    "Artists have painted {t} for a very long time.", "Every season shows {t} in a different light.",
]


def template_content(topic: str, rng: random.Random, n: int = 4) -> str:
    """Filler prose about a topic (``--skip-model``, and a fallback base when the model's answer is empty)."""
    facts = rng.sample(TEMPLATE_FACTS, min(n, len(TEMPLATE_FACTS)))
    return " ".join(f.format(t=topic, T=topic[0].upper() + topic[1:]) for f in facts)


def n_passed(text: str, rec: dict) -> int:
    if not text.strip():
        return 0
    return sum(check_record(text, rec["instruction_id_list"], rec["kwargs"]))


def judge(text: str, rec: dict) -> bool:
    """The harness's strict verdict on every instruction of the record."""
    return bool(text.strip()) and n_passed(text, rec) == len(rec["instruction_id_list"])


def repair(text: str, rec: dict, drop: str | None = None) -> str | None:
    """``text`` cut to whole sentences and made to satisfy the record's instructions (all, or all but
    ``drop``); None when the fixers cannot."""
    pairs = [(i, k) for i, k in zip(rec["instruction_id_list"], rec["kwargs"]) if i != drop]
    base = whole_sentences(text, **content_limits(rec)) or text.strip()
    if not base:
        return None
    try:
        return apply_constraints(base, [i for i, _ in pairs], [k for _, k in pairs], topic=rec.get("topic"))
    except ValueError:
        return None


def length_only(a: str, b: str) -> bool:
    """One text is the other cut short or padded: its tokens (case and punctuation kept) are a prefix of the
    other's, so the two differ in nothing but length."""
    wa, wb = a.split(), b.split()
    short, long_ = sorted((wa, wb), key=len)
    return long_[:len(short)] == short


def build_pairs(records: list[dict], samples: list[str], k: int, rng: random.Random,
                max_ranked: int = 0) -> tuple[list[dict], list[dict], Counter]:
    """Preference pairs from `k` samples per record (`samples[j*k:(j+1)*k]` belong to `records[j]`): chosen
    follows every instruction (a sample, else a repaired one), rejected fewer (a failing sample, else a sample
    repaired with one instruction left out, else template prose); a record without a chosen or a rejected is
    skipped (counted in the returned sources). Also up to `max_ranked` ranked lists. `rng` draws the template
    prose and the order of the instructions to leave out."""
    prefs: list[dict] = []
    ranked: list[dict] = []
    sources: Counter = Counter()
    for j, r in enumerate(records):
        total = len(r["instruction_id_list"])
        outs = list(dict.fromkeys(s.strip() for s in samples[j * k:(j + 1) * k] if s.strip()))
        passed = {s: n_passed(s, r) for s in outs}
        template = template_content(r["topic"], rng, n=min(10, max(4, content_limits(r)["max_sentences"])))
        chosen, c_src = next(((s, "sample") for s in outs if passed[s] == total), (None, "repaired"))
        if chosen is None:
            chosen = next((f for f in (repair(s, r) for s in outs + [template]) if f and judge(f, r)), None)
        if chosen is None:
            sources["skipped_no_chosen"] += 1
            continue
        rejected, r_src = next(((s, "sample") for s in outs if passed[s] < total and not length_only(chosen, s)),
                               (None, None))
        if rejected is None:  # every sample passed: repair one with an instruction left out (length last)
            order = sorted(r["instruction_id_list"], key=lambda i: (i == WORDS, rng.random()))
            for base, src in [(s, "undone") for s in outs] + [(template, "template")]:
                for drop in order:
                    cand = repair(base, r, drop)
                    if cand and cand != chosen and n_passed(cand, r) < total and not length_only(chosen, cand):
                        rejected, r_src = cand, src
                        break
                if rejected is not None:
                    break
        if rejected is None:
            sources["skipped_no_rejected"] += 1
            continue
        sources[f"chosen_{c_src}"] += 1
        sources[f"rejected_{r_src}"] += 1
        prefs.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected,
                      "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"],
                      "chosen_source": c_src, "rejected_source": r_src})
        # A ranked list: rank = number of instructions failed (ties share a rank).
        candidates = list(dict.fromkeys([chosen] + outs))
        if len(ranked) < max_ranked and len(candidates) >= 3:
            fails = [total - n_passed(s, r) for s in candidates]
            if len(set(fails)) > 1:
                ranked.append({"prompt": r["prompt"], "responses": candidates, "ranks": fails})
    return prefs, ranked, sources


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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


# --------------------------------------------------------------------------------------------
# Checks (run before anything is written, and again on the written files by tests/test_data_files.py)
# --------------------------------------------------------------------------------------------

TRAIN_FILES = ("sft.jsonl", "prefs.jsonl", "prefs_ranked.jsonl", "prompts.jsonl", "prompts_general.jsonl")
DEFAULT_OUT = ROOT / "data" / "constraints"
DEFAULT_HELDOUT = ROOT / "eval" / "constraints"
# Held-out preference pairs (issue #22), next to heldout.jsonl; their generator is Random(seed + offset).
HELDOUT_PAIRS_FILE = "prefs_heldout.jsonl"
HELDOUT_PAIRS_SEED_OFFSET = 22_000


def check_prompts(train: list[tuple[str, str]], held: list[str]) -> None:
    """`train`: (where, prompt) of every training prompt; `held`: the held-out prompts. DataError when a
    training prompt carries a held-out topic, framing or phrasing, a held-out prompt, or the opening of an
    IFEval prompt (IFEval is for evaluation only)."""
    held_set = set(held)
    for where, p in train:
        leak = leaks_heldout(p)
        if leak:
            raise DataError(f"{where}: the training prompt contains the {leak}; training must never show the "
                            "held-out pools (data/make_constraints.py HELDOUT_*).")
        if p in held_set:
            raise DataError(f"{where}: the training prompt is also a held-out prompt.")
    hits = find_ifeval_prompts([p for _, p in train])
    if hits:
        row, key = hits[0]
        raise DataError(f"{train[row][0]}: the training prompt contains the opening of IFEval prompt key {key} "
                        f"({len(hits)} such prompt(s)); IFEval is for evaluation only.")


def check_heldout_pairs(pairs: list[dict], train: list[tuple[str, str]]) -> None:
    """DataError naming the pair when a held-out preference pair's prompt is a training prompt (`train`:
    (where, prompt) of every training prompt: sft, prefs, prefs_ranked, prompts, prompts_general)."""
    train_set = {p for _, p in train}
    for i, r in enumerate(pairs, start=1):
        if r["prompt"] in train_set:
            raise DataError(f"{HELDOUT_PAIRS_FILE} row {i}: the held-out pair's prompt is also a training prompt.")


def check_heldout(rows: list[dict], min_per_id: int) -> Counter:
    """Every one of the 25 ids occurs at least `min_per_id` times in the held-out prompts; returns the counts."""
    counts = Counter(i for r in rows for i in r["instruction_id_list"])
    short = {i: counts[i] for i in all_ids() if counts[i] < min_per_id}
    if short:
        raise DataError(f"held-out prompts: these instruction ids occur fewer than {min_per_id} times: {short}; "
                        "raise --n-heldout.")
    return counts


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_disjoint(out: Path, held_out: Path) -> None:
    """The written files: no held-out topic, framing or phrasing, no held-out prompt (heldout.jsonl or a
    held-out pair's) and no IFEval prompt in any training prompt (DataError naming the file and row)."""
    train = [(f"{out / name} row {i}", r["prompt"]) for name in TRAIN_FILES if (out / name).exists()
             for i, r in enumerate(_read(out / name), start=1)]
    held = [r["prompt"] for name in ("heldout.jsonl", HELDOUT_PAIRS_FILE) if (held_out / name).exists()
            for r in _read(held_out / name)]
    check_prompts(train, held)
    # The same guard the training stages' data loading can use, on the files as written.
    assert_no_ifeval_prompts([out / name for name in TRAIN_FILES])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="training files (default data/constraints)")
    ap.add_argument("--heldout-out", default=None,
                    help="held-out file's folder (default eval/constraints, or OUT/heldout when --out is given)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sft", type=int, default=600, help="SFT prompts drawn (rows kept: those that pass)")
    ap.add_argument("--n-prefs", type=int, default=320, help="preference prompts drawn")
    ap.add_argument("--n-prompts", type=int, default=400, help="RL prompts")
    ap.add_argument("--n-heldout", type=int, default=125, help="held-out prompts")
    ap.add_argument("--n-general", type=int, default=200, help="prompts without instructions (prompts_general)")
    ap.add_argument("--min-heldout-per-id", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2, help="samples per preference prompt")
    ap.add_argument("--format-negatives", type=int, default=12,
                    help="pairs per unrequested format (chosen vs chosen + a format its prompt did not ask for)")
    ap.add_argument("--skip-model", action="store_true", help="template content instead of model samples")
    ap.add_argument("--sft-content", choices=["bare", "instructed"], default="bare",
                    help="SFT content: the model's greedy answer to the bare task (default), or to the prompt WITH "
                         "its instructions (each demonstration is then a minimal edit of what the model does)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"make_constraints: {e}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    out = Path(args.out)
    if args.heldout_out:
        held_out = Path(args.heldout_out)
    else:
        held_out = DEFAULT_HELDOUT if out.resolve() == DEFAULT_OUT.resolve() else out / "heldout"
    ids = all_ids()
    fixable = [i for i in ids if i in set(checkers.FIXABLE_IDS)]
    conflicts = conflict_pairs()
    sample = Sampler(args.skip_model)

    # 1. Prompts for every split, drawn without repeating a prompt text. Each split has its own generator,
    #    so changing one split's size never changes another's prompts.
    seen: set[str] = set()

    def draw(n: int, heldout: bool, gen: random.Random, pool: list[str]) -> list[dict]:
        counts: Counter = Counter({i: 0 for i in pool})
        rows: list[dict] = []
        for _ in range(100 * n + 1000):
            if len(rows) >= n:
                break
            r = make_prompt(gen, heldout, counts, pool, conflicts)
            if r["prompt"] in seen or (not heldout and leaks_heldout(r["prompt"])):
                continue
            seen.add(r["prompt"])
            counts.update(r["instruction_id_list"])
            rows.append(r)
        return rows

    held_p = draw(args.n_heldout, True, random.Random(f"heldout-{args.seed}"), ids)
    sft_p = draw(args.n_sft, False, random.Random(f"sft-{args.seed}"), fixable)
    pref_p = draw(args.n_prefs, False, random.Random(f"prefs-{args.seed}"), fixable)
    rl_p = draw(args.n_prompts, False, random.Random(f"rl-{args.seed}"), ids)
    gen = random.Random(f"general-{args.seed}")
    general: list[str] = []
    for _ in range(100 * args.n_general + 1000):
        if len(general) >= args.n_general:
            break
        task = gen.choice(TRAIN_TASKS).format(t=gen.choice(TRAIN_TOPICS))
        if task not in general and not leaks_heldout(task):
            general.append(task)

    # 2. SFT: the model's own greedy answer (to the bare task, or to the instructed prompt), made to satisfy
    #    the instructions; only rows the harness passes are kept.
    content_key = "task" if args.sft_content == "bare" else "prompt"
    if args.skip_model:
        plain: dict = {}
    else:
        keys = sorted({r[content_key] for r in sft_p})
        plain = dict(zip(keys, sample(keys, False, CONTENT_TOKENS, f"{args.sft_content} answers",
                                      CONTENT_REPETITION_PENALTY)))
    sft_rows = []
    for r in sft_p:
        lim = content_limits(r)
        base = whole_sentences(plain.get(r[content_key], ""), **lim)
        if len(base.split()) < 25:
            base = (base + " " + template_content(r["topic"], rng, n=min(10, max(4, lim["max_sentences"])))).strip()
        try:
            text = apply_constraints(base, r["instruction_id_list"], r["kwargs"], topic=r.get("topic"))
        except ValueError:
            continue
        if judge(text, r):
            sft_rows.append({"prompt": r["prompt"], "completion": text,
                             "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]})

    # 3. Preference pairs: chosen follows every instruction, rejected fewer.
    k = args.samples
    flat = [r["prompt"] for r in pref_p for _ in range(k)]
    samples = sample(flat, True, 112, "preference samples") if not args.skip_model else [
        template_content(r["topic"], rng) for r in pref_p for _ in range(k)]
    prefs, ranked, sources = build_pairs(pref_p, samples, k, rng, max_ranked=20)
    # 3b. Unrequested-format pairs: the chosen side above is where P.S. lines, ALL CAPS, <<titles>> and quoted
    #     replies appear (their prompts asked), so a reward model can learn "marker -> better" and PPO then adds
    #     the marker everywhere. These pairs prefer the answer without a format its prompt did not ask for.
    #     Appended last, drawn with a generator of their own: the rows above are unchanged.
    negatives = format_negative_pairs(prefs, random.Random(f"format-negatives-{args.seed}"), args.format_negatives)
    sources.update(p["rejected_source"] for p in negatives)
    prefs += negatives

    # 4. Prompt-only records: RL, general (no instructions), held-out.
    def prompt_rows(rows: list[dict], prefix: str) -> list[dict]:
        return [{"id": f"{prefix}-{i:04d}", "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
                 "kwargs": r["kwargs"]} for i, r in enumerate(rows)]

    general_rows = [{"id": f"general-{i:04d}", "prompt": p, "instruction_id_list": [], "kwargs": []}
                    for i, p in enumerate(general)]
    files = {"sft.jsonl": sft_rows, "prefs.jsonl": prefs, "prefs_ranked.jsonl": ranked,
             "prompts.jsonl": prompt_rows(rl_p, "rl"), "prompts_general.jsonl": general_rows}
    held_rows = prompt_rows(held_p, "heldout")

    # 4b. Held-out preference pairs (issue #22): the same procedure as the training pairs on the held-out
    #     prompts (held-out framings, topics and phrasings), to measure the reward model on pairs it never
    #     trained on. Drawn last and with a generator of its own, so every file above is unchanged.
    held_rng = random.Random(args.seed + HELDOUT_PAIRS_SEED_OFFSET)
    flat_held = [r["prompt"] for r in held_p for _ in range(k)]
    held_samples = sample(flat_held, True, 112, "held-out preference samples") if not args.skip_model else [
        template_content(r["topic"], held_rng) for r in held_p for _ in range(k)]
    held_prefs, _, held_sources = build_pairs(held_p, held_samples, k, held_rng)

    # 5. Checks before anything is written: held-out coverage, disjointness, no IFEval prompt in training.
    held_counts = check_heldout(held_rows, args.min_heldout_per_id)
    train_prompts = [(f"{name} row {i}", row["prompt"]) for name, rows in files.items()
                     for i, row in enumerate(rows, start=1)]
    check_prompts(train_prompts, [r["prompt"] for r in held_rows])
    check_heldout_pairs(held_prefs, train_prompts)
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    write_jsonl(held_out / "heldout.jsonl", held_rows)
    write_jsonl(held_out / HELDOUT_PAIRS_FILE, held_prefs)
    check_disjoint(out, held_out)

    def id_counts(rows: list[dict]) -> dict:
        c = Counter(i for r in rows for i in r["instruction_id_list"])
        return {i: c[i] for i in ids}

    stats = {
        "out": str(out), "heldout_out": str(held_out),
        "rows": {**{name.removesuffix(".jsonl"): len(rows) for name, rows in files.items()}, "heldout": len(held_rows),
                 "prefs_heldout": len(held_prefs)},
        "pairs": dict(sorted(sources.items())),
        "pairs_heldout": dict(sorted(held_sources.items())),
        "instructions_per_prompt": dict(sorted(Counter(len(r["instruction_id_list"])
                                                       for r in rl_p + held_p).items())),
        "phrasing_sources_train": dict(Counter(s for r in sft_p + pref_p + rl_p for s in r["sources"])),
        "fixable_ids": len(fixable),
        "ids": {"sft": id_counts(sft_rows), "prefs": id_counts(prefs), "prompts": id_counts(rl_p),
                "heldout": {i: held_counts[i] for i in ids}, "prefs_heldout": id_counts(held_prefs)},
    }
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
