"""Generated tasks: deterministic, tiny, each with its own vocabulary so fingerprints can tell them apart.
Words are common English (whole words in BERT's WordPiece vocab)."""

import random
from functools import cache
from pathlib import Path

from atlasfl.data.example import Example, Split, stable_seed

GEN_TRAIN, GEN_TEST = 400, 100

_FOODS = ("soup", "bread", "pizza", "pasta", "salad", "cheese", "chicken", "rice", "cake", "coffee",
          "tea", "fish", "steak", "burger", "sandwich", "pie", "eggs", "beans", "noodles", "dessert")
_EATERIES = ("restaurant", "cafe", "bakery", "hotel", "kitchen", "bar", "canteen", "market")
_TASTES = (
    ("awful", "bland", "terrible", "bad", "stale", "salty", "dry", "horrible", "greasy", "burnt"),
    ("delicious", "fresh", "sweet", "wonderful", "great", "excellent", "perfect", "lovely", "good", "rich"),
)
_SPORTS = (  # gen_topic labels: football, tennis, basketball, swimming
    ("goal", "striker", "penalty", "kick", "header", "goalkeeper", "corner", "tackle"),
    ("court", "serve", "ace", "volley", "net", "baseline", "slice", "smash"),
    ("hoop", "shot", "rebound", "basket", "block", "jump", "pass", "foul"),
    ("pool", "lane", "lap", "stroke", "dive", "butterfly", "breaststroke", "relay"),
)
_ATHLETES = ("coach", "captain", "player", "star", "rookie", "champion", "veteran", "team")
_EVENTS = ("final", "game", "match", "season", "tournament", "league", "semifinal", "championship")
_CITIES = ("london", "paris", "berlin", "tokyo", "madrid", "rome", "boston", "chicago", "sydney",
           "dublin", "moscow", "cairo", "vienna", "seattle", "toronto", "denver")
_WHEN = ("today", "tonight", "this morning", "this afternoon", "this week", "tomorrow")
_WEATHER = (
    ("rainy", "cold", "stormy", "windy", "wet", "misty", "freezing", "grey"),
    ("sunny", "warm", "clear", "bright", "mild", "dry", "pleasant", "calm"),
)
_NUMBERS = (("two", "three", "four"), ("five", "six", "seven"), ("eight", "nine", "ten"))
_ANIMALS = ("cows", "horses", "sheep", "dogs", "cats", "birds", "pigs", "ducks", "goats", "rabbits", "chickens",
            "geese")
_FIELDS = ("field", "barn", "garden", "park", "yard", "forest", "farm", "river", "meadow", "zoo")


def _gen_example(name: str, label: int, r: random.Random) -> Example:
    if name == "gen_sentiment":  # food reviews, negative/positive
        a, b = r.sample(_TASTES[label], 2)
        food, food2 = r.sample(_FOODS, 2)
        text = r.choice((
            f"the {food} at this {r.choice(_EATERIES)} was {a}",
            f"we had {food} for dinner and it was {a} and {b}",
            f"my {food} tasted {a} and the {food2} was {b}",
        ))
        return Example(text, None, label)
    if name == "gen_topic":  # which sport a sports report is about
        a, b = r.sample(_SPORTS[label], 2)
        who, event = r.choice(_ATHLETES), r.choice(_EVENTS)
        text = r.choice((
            f"the {who} made a {a} and a {b} during the {event}",
            f"after the {a} the {who} was ready for the {b} in the {event}",
            f"fans at the {event} cheered the {who} for the {a}",
        ))
        return Example(text, None, label)
    if name == "gen_pair":  # question about a city's weather, answer; label: is the weather good
        city, when = r.choice(_CITIES), r.choice(_WHEN)
        a, b = r.sample(_WEATHER[label], 2)
        question = r.choice((f"what is the weather like in {city} {when} ?", f"how is the weather in {city} {when} ?"))
        answer = r.choice((f"it is {a} and {b} in {city} {when}", f"{when} {city} will be {a} and {b}"))
        return Example(question, answer, label)
    # gen_count: how many animals, in three bands (few, some, many)
    number, animals, place = r.choice(_NUMBERS[label]), r.choice(_ANIMALS), r.choice(_FIELDS)
    text = r.choice((
        f"there are {number} {animals} in the {place}",
        f"the farmer counted {number} {animals} near the {place}",
        f"i saw {number} {animals} by the {place} yesterday",
    ))
    return Example(text, None, label)


@cache
def load(name: str, labels: tuple[str, ...], data_dir: Path | None) -> Split:
    """GEN_TRAIN + GEN_TEST distinct examples with balanced `labels`, the same on every machine; `data_dir` is
    GLUE's folder, unused here."""
    r = random.Random(stable_seed("generated", name))
    examples: dict[Example, None] = {}
    while len(examples) < GEN_TRAIN + GEN_TEST:
        examples.setdefault(_gen_example(name, len(examples) % len(labels), r))
    examples = list(examples)
    r.shuffle(examples)
    return examples[:GEN_TRAIN], examples[GEN_TRAIN:]
