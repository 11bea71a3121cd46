"""`synthetic`: multi-session recall of facts about people, told in passing among real chat, some changed later.

Each episode is a conversation between two speakers over several dated sessions, built to a target length in
reasoner tokens from real filler dialogue (`filler.py`). Into it go facts about other people (where they live, what
they do, their dog's name, favourite food, birthday, a locker number, car colour, sport, instrument), each told
once. Every fact asked about is one of three kinds, which is the question's category:
- "single": told once;
- "updated": told, then changed in a later turn ("... moved again, to Lyon"): the latest value is the answer;
- "distractor": told once, with another turn that mentions the same person with another value of the same kind
  ("... spent a weekend in Oslo") that is not the answer.

With `perspective="user"` the conversation is a user's chat with an assistant, as memsplice's own chats are: the
speakers are "user" and "assistant", the user gives their full name in the first turn ("Hi! I'm Priya Raman."),
and half the facts (rounded up) are the user's own, told by the user in the first person ("I moved to Lyon last
year"); the questions about them name the user ("Where does Priya live?"), a name the fact's turn does not hold.
The other facts are about other people, as in the default perspective ("others"), which is unchanged by this
option.

Guarantees: seeded and reproducible; the "train" and "test" splits draw names and values from disjoint pools (by a
fixed hash), so they never share a fact, and their filler comes from disjoint dialogues; within an episode every
person and every value is distinct, so each question has exactly one right answer. Evidence is the turn that
states the answer (for "updated": the update).

With `values="open"` every value is made up afresh for each fact (`open_value`: pronounceable non-words for
places, jobs, names, foods, colours, sports and instruments; random dates and numbers), never one of the listed
values of either split. A model cannot have learned such an answer anywhere: it has to carry it out of the history.
Pool episodes are unchanged by this option (same seeds, same episodes).

With `names="open"` the people's first and last names are made up for each episode (`open_name`), never one of the
listed names of either split; episodes with listed names are unchanged by this option.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...data import split_of
from .base import CountTokens, Episode, Question, TaskArgs, register_task
from .filler import PlannedTurn, assemble_history, filler_turns

TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    tell: tuple[str, ...]
    """Templates with {who} and {value}: the fact as first told."""
    update: tuple[str, ...]
    """The fact changed; {who} and {value} (the new value)."""
    distract: tuple[str, ...]
    """A mention of {who} with another {value} of this kind that is not the answer."""
    question: str


ATTRIBUTES = (
    Attribute(
        "city",
        (
            "Lisbon",
            "Porto",
            "Lyon",
            "Oslo",
            "Bergen",
            "Krakow",
            "Seville",
            "Valencia",
            "Toulouse",
            "Ghent",
            "Utrecht",
            "Tallinn",
            "Riga",
            "Vilnius",
            "Zagreb",
            "Ljubljana",
            "Brno",
            "Graz",
            "Salzburg",
            "Bologna",
            "Turin",
            "Naples",
            "Palermo",
            "Dublin",
            "Galway",
            "Cardiff",
            "Leeds",
            "Glasgow",
            "Aarhus",
            "Malmo",
            "Uppsala",
            "Tampere",
            "Geneva",
            "Basel",
            "Antwerp",
            "Bruges",
            "Bremen",
            "Leipzig",
            "Dresden",
            "Munich",
        ),
        ("{who} lives in {value} now.", "{who} moved to {value} last year and loves it there."),
        ("{who} moved again, to {value} this time.", "{who} just relocated to {value} for good."),
        ("{who} spent a weekend in {value} last month.", "{who} keeps talking about a trip to {value}."),
        "Where does {who} live?",
    ),
    Attribute(
        "job",
        (
            "pharmacist",
            "carpenter",
            "nurse",
            "architect",
            "baker",
            "electrician",
            "librarian",
            "pilot",
            "dentist",
            "plumber",
            "translator",
            "veterinarian",
            "geologist",
            "firefighter",
            "tailor",
            "chemist",
            "surveyor",
            "locksmith",
            "midwife",
            "paramedic",
            "florist",
            "butcher",
            "jeweller",
            "optician",
            "welder",
            "beekeeper",
            "cartographer",
            "sommelier",
            "glassblower",
            "zookeeper",
        ),
        ("{who} works as a {value}.", "{who} has a job as a {value} these days."),
        ("{who} changed careers and is a {value} now.", "{who} quit and started working as a {value}."),
        ("{who} once thought about becoming a {value}.", "{who}'s neighbour is a {value}."),
        "What does {who} do for work?",
    ),
    Attribute(
        "dog",
        (
            "Biscuit",
            "Pepper",
            "Juniper",
            "Waffles",
            "Mochi",
            "Pickles",
            "Nugget",
            "Sprocket",
            "Tofu",
            "Bramble",
            "Clementine",
            "Rocket",
            "Pumpkin",
            "Marble",
            "Ziggy",
            "Noodle",
            "Pretzel",
            "Bingo",
            "Maple",
            "Cosmo",
            "Truffle",
            "Domino",
            "Peanut",
            "Sherlock",
            "Olive",
            "Gizmo",
            "Hazel",
            "Basil",
            "Ginger",
            "Toffee",
        ),
        ("{who} has a dog called {value}.", "{who}'s dog is named {value}."),
        (
            "{who} renamed the dog, it answers to {value} now.",
            "{who} decided the dog should be called {value} instead.",
        ),
        (
            "{who} looked after a friend's dog called {value} once.",
            "{who} met a dog named {value} at the park.",
        ),
        "What is the name of {who}'s dog?",
    ),
    Attribute(
        "food",
        (
            "lasagna",
            "ramen",
            "paella",
            "dumplings",
            "falafel",
            "risotto",
            "pierogi",
            "tacos",
            "goulash",
            "sushi",
            "moussaka",
            "curry",
            "pad thai",
            "gnocchi",
            "bibimbap",
            "empanadas",
            "ratatouille",
            "pho",
            "shakshuka",
            "couscous",
            "tagine",
            "biryani",
            "fondue",
            "ceviche",
            "burritos",
            "schnitzel",
            "pancakes",
            "meatballs",
        ),
        ("{who}'s favourite food is {value}.", "{who} says nothing beats {value}."),
        ("{who} has a new favourite food: {value}.", "{who} says {value} is the favourite food now."),
        ("{who} tried {value} once and did not like it.", "{who} cooked {value} for a party last week."),
        "What is {who}'s favourite food?",
    ),
    Attribute(
        "birthday",
        tuple(
            f"{d} {m}"
            for m in ("January", "March", "May", "July", "September", "November", "February", "April")
            for d in (3, 9, 14, 21, 27)
        ),
        ("{who}'s birthday is on {value}.", "{who} celebrates a birthday every {value}."),
        (
            "I had it wrong, {who}'s birthday is actually on {value}.",
            "Correction: {who}'s birthday is on {value}.",
        ),
        ("{who} has a dentist appointment on {value}.", "{who}'s sister has her birthday on {value}."),
        "When is {who}'s birthday?",
    ),
    Attribute(
        "locker",
        tuple(str(n) for n in range(101, 1000, 23)),
        ("{who}'s locker number at the gym is {value}.", "{who} always uses locker {value} at the gym."),
        ("{who} got a new gym locker, number {value}.", "The gym moved {who} to locker number {value}."),
        ("{who} takes bus number {value} to the gym.", "{who}'s flat is number {value}."),
        "What is {who}'s locker number at the gym?",
    ),
    Attribute(
        "car",
        (
            "red",
            "blue",
            "green",
            "yellow",
            "silver",
            "black",
            "white",
            "orange",
            "purple",
            "brown",
            "grey",
            "teal",
            "maroon",
            "beige",
            "navy",
            "turquoise",
            "gold",
            "pink",
        ),
        ("{who} drives a {value} car.", "{who}'s car is {value}."),
        ("{who} had the car repainted {value}.", "{who} sold the old car and bought a {value} one."),
        ("{who} rented a {value} car on holiday.", "{who}'s brother drives a {value} car."),
        "What colour is {who}'s car?",
    ),
    Attribute(
        "sport",
        (
            "tennis",
            "badminton",
            "squash",
            "volleyball",
            "handball",
            "rugby",
            "cricket",
            "hockey",
            "fencing",
            "rowing",
            "climbing",
            "judo",
            "karate",
            "archery",
            "curling",
            "water polo",
            "table tennis",
            "lacrosse",
            "golf",
            "baseball",
            "basketball",
            "softball",
        ),
        ("{who} plays {value} every weekend.", "{who} is really into {value}."),
        ("{who} gave up the old sport and plays {value} now.", "{who} switched to {value} this season."),
        ("{who} watched a {value} match on TV.", "{who}'s cousin coaches {value}."),
        "Which sport does {who} play?",
    ),
    Attribute(
        "instrument",
        (
            "cello",
            "violin",
            "trumpet",
            "clarinet",
            "harp",
            "accordion",
            "banjo",
            "oboe",
            "flute",
            "saxophone",
            "trombone",
            "ukulele",
            "mandolin",
            "bassoon",
            "harmonica",
            "piano",
            "drums",
            "viola",
            "tuba",
            "bagpipes",
        ),
        ("{who} plays the {value}.", "{who} has been learning the {value} for years."),
        (
            "{who} switched instruments and plays the {value} now.",
            "{who} sold the old instrument and took up the {value}.",
        ),
        ("{who} went to a {value} concert.", "{who}'s teacher plays the {value}."),
        "Which instrument does {who} play?",
    ),
)

SELF_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # attribute -> (tell, update, distract) in the first person, {value} as in `Attribute`
    "city": (
        ("I live in {value} now.", "I moved to {value} last year and I love it there."),
        ("I moved again, to {value} this time.", "I just relocated to {value} for good."),
        ("I spent a weekend in {value} last month.", "I keep thinking about a trip to {value}."),
    ),
    "job": (
        ("I work as a {value}.", "I have a job as a {value} these days."),
        ("I changed careers and I am a {value} now.", "I quit and started working as a {value}."),
        ("I once thought about becoming a {value}.", "My neighbour is a {value}."),
    ),
    "dog": (
        ("I have a dog called {value}.", "My dog is named {value}."),
        (
            "I renamed my dog, it answers to {value} now.",
            "I decided my dog should be called {value} instead.",
        ),
        ("I looked after a friend's dog called {value} once.", "I met a dog named {value} at the park."),
    ),
    "food": (
        ("My favourite food is {value}.", "Nothing beats {value} for me."),
        ("I have a new favourite food: {value}.", "These days {value} is my favourite food."),
        ("I tried {value} once and did not like it.", "I cooked {value} for a party last week."),
    ),
    "birthday": (
        ("My birthday is on {value}.", "I celebrate my birthday every {value}."),
        (
            "I had it wrong before, my birthday is actually on {value}.",
            "Correction: my birthday is on {value}.",
        ),
        ("I have a dentist appointment on {value}.", "My sister has her birthday on {value}."),
    ),
    "locker": (
        ("My locker number at the gym is {value}.", "I always use locker {value} at the gym."),
        ("I got a new gym locker, number {value}.", "The gym moved me to locker number {value}."),
        ("I take bus number {value} to the gym.", "My flat is number {value}."),
    ),
    "car": (
        ("I drive a {value} car.", "My car is {value}."),
        ("I had my car repainted {value}.", "I sold my old car and bought a {value} one."),
        ("I rented a {value} car on holiday.", "My brother drives a {value} car."),
    ),
    "sport": (
        ("I play {value} every weekend.", "I am really into {value}."),
        ("I gave up my old sport and play {value} now.", "I switched to {value} this season."),
        ("I watched a {value} match on TV.", "My cousin coaches {value}."),
    ),
    "instrument": (
        ("I play the {value}.", "I have been learning the {value} for years."),
        (
            "I switched instruments and play the {value} now.",
            "I sold my old instrument and took up the {value}.",
        ),
        ("I went to a {value} concert.", "My teacher plays the {value}."),
    ),
}
"""First-person facts of the user (`perspective="user"`), one entry per attribute of `ATTRIBUTES`."""

INTRODUCTIONS = ("Hi! I'm {name}.", "Hello, my name is {name}.", "Hey there, {name} here.")
"""The user's first turn (`perspective="user"`)."""

FIRST_NAMES = (
    "Ana",
    "Tomas",
    "Priya",
    "Jonas",
    "Mei",
    "Lucas",
    "Amara",
    "Felix",
    "Ingrid",
    "Mateo",
    "Yara",
    "Oskar",
    "Leila",
    "Hugo",
    "Nadia",
    "Emil",
    "Sofia",
    "Ravi",
    "Clara",
    "Malik",
    "Greta",
    "Diego",
    "Hana",
    "Viktor",
    "Zoe",
    "Anders",
    "Lina",
    "Omar",
    "Elena",
    "Bruno",
    "Keiko",
    "Paolo",
    "Freya",
    "Samir",
    "Alba",
    "Nils",
    "Chiara",
    "Idris",
    "Maren",
    "Tariq",
    "Selma",
    "Marco",
    "Aisha",
    "Henrik",
    "Lucia",
    "Kofi",
    "Vera",
    "Rafael",
    "Ines",
    "Dario",
    "Mila",
    "Arjun",
    "Petra",
    "Jakub",
    "Noor",
    "Lars",
    "Carmen",
    "Yusuf",
    "Astrid",
    "Teodor",
)
LAST_NAMES = (
    "Ruiz",
    "Berg",
    "Novak",
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Costa",
    "Fischer",
    "Kowalski",
    "Haddad",
    "Jensen",
    "Rossi",
    "Nakamura",
    "Silva",
    "Petrov",
    "Dubois",
    "Larsen",
    "Mendes",
    "Horvat",
    "Sato",
    "Keller",
    "Varga",
    "Adeyemi",
    "Quinn",
    "Ivanova",
    "Brandt",
    "Castro",
    "Ahmed",
    "Holm",
    "Marin",
    "Sorensen",
    "Weber",
    "Popescu",
    "Laine",
    "Ferreira",
    "Nilsson",
    "Duarte",
    "Kaya",
    "Hoffmann",
)
RELATIONS = (
    "friend",
    "colleague",
    "neighbour",
    "cousin",
    "old roommate",
    "teammate",
    "classmate",
    "flatmate",
    "landlord",
    "old school friend",
)
OPENERS = (
    "",
    "By the way, ",
    "Oh, I forgot to mention: ",
    "Oh, and ",
    "Speaking of which, ",
    "Anyway, ",
    "Random update: ",
    "Did I tell you? ",
)


ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "st",
    "tr",
)
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
OPEN_SHAPES = {
    # attribute: (syllables low..high, capitalised, suffixes)
    "city": (2, 3, True, ("", "", "burg", "ova", "ton")),
    "job": (2, 3, False, ("ist", "er", "ian", "smith")),
    "dog": (2, 2, True, ("", "y", "o")),
    "food": (2, 3, False, ("", "i", "a")),
    "car": (2, 2, False, ("", "")),
    "sport": (2, 3, False, ("ball", "", "ing")),
    "instrument": (2, 3, False, ("", "phone", "ina")),
}


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(
        rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(low, high))
    )


def open_value(attribute: Attribute, rng: random.Random) -> str:
    """A value of `attribute`'s kind made up for one fact, never one of the attribute's listed values."""
    while True:
        if attribute.name == "birthday":
            value = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
        elif attribute.name == "locker":
            value = str(rng.randint(10, 9999))
        else:
            low, high, capital, suffixes = OPEN_SHAPES[attribute.name]
            value = _word(rng, low, high) + rng.choice(suffixes)
            value = value.capitalize() if capital else value
        if value not in attribute.values:
            return value


def open_name(rng: random.Random, listed: tuple[str, ...]) -> str:
    """A capitalised made-up name of two syllables, never one of `listed`."""
    while True:
        name = _word(rng, 2, 2).capitalize()
        if name not in listed:
            return name


def _distinct(draw, size: int) -> list[str]:
    """`size` different values of `draw()`, in the order first drawn."""
    values: list[str] = []
    while len(values) < size:
        value = draw()
        if value not in values:
            values.append(value)
    return values


def _in_split(kind: str, value: str, split: str) -> bool:
    return (split_of(f"synthetic:{kind}:{value}", TEST_FRACTION) == "heldout") == (split == "test")


def _pool(kind: str, values: tuple[str, ...], split: str) -> list[str]:
    pool = [v for v in values if _in_split(kind, v, split)]
    assert len(pool) >= 4, f"{kind}: the {split} split holds only {len(pool)} values"
    return pool


def answer_aliases(attribute: str, value: str) -> tuple[str, ...]:
    """Other spellings of a value that count as the answer: dates as "September 9", "September 9th", "9th September"."""
    if attribute != "birthday":
        return ()
    day, month = value.split()
    suffix = "th" if 10 <= int(day) % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(int(day) % 10, "th")
    return (f"{month} {day}", f"{month} {day}{suffix}", f"{day}{suffix} {month}", f"{day}{suffix} of {month}")


def _sentence(opener: str, text: str) -> str:
    if not opener.endswith(", "):
        text = text[0].upper() + text[1:]
    return opener + text


def build_episode(args: TaskArgs, target_tokens: int, index: int, count_tokens: CountTokens) -> Episode:
    """One episode of `target_tokens` history (seeded by args.seed, the length and the index)."""
    open_values = args.values == "open"
    # pool episodes of the default perspective keep the seeds (and so the episodes) they always had
    open_names = args.names == "open"
    tag = ("|open" if open_values else "") + ("|user" if args.perspective == "user" else "")
    tag += "|names" if open_names else ""
    rng = random.Random(f"synthetic|{args.split}|{args.seed}|{target_tokens}|{index}{tag}")
    if open_names:
        first = _distinct(lambda: open_name(rng, FIRST_NAMES + LAST_NAMES), args.facts + 2)
        last = _distinct(lambda: open_name(rng, FIRST_NAMES + LAST_NAMES + tuple(first)), 16)
    else:
        first = _pool("first", FIRST_NAMES, args.split)
        last = _pool("last", LAST_NAMES, args.split)
    if args.facts + 2 > len(first):
        raise ValueError(f"synthetic: at most {len(first) - 2} facts per episode (got {args.facts})")
    firsts = rng.sample(first, args.facts + 2)  # distinct first names: nobody is confused with anybody else
    speakers = (firsts.pop(), firsts.pop())
    people = [f"{f} {rng.choice(last)}" for f in firsts]
    as_user = args.perspective == "user"
    own = -(-args.facts // 2) if as_user else 0  # facts 0 .. own-1 are the user's own
    planned: list[PlannedTurn] = []
    if as_user:
        user = f"{speakers[0]} {rng.choice(last)}"
        people[:own] = [user] * own
        planned.append(PlannedTurn(0.0, rng.choice(INTRODUCTIONS).format(name=user), "intro", speaker=0))
        speakers = ("user", "assistant")
    by = 0 if as_user else None  # in a user's chat the user tells every fact
    # Each attribute at most once per round through them, so a pool never runs dry.
    attributes = [
        a for _ in range(-(-args.facts // len(ATTRIBUTES))) for a in rng.sample(ATTRIBUTES, len(ATTRIBUTES))
    ]
    attributes = attributes[: args.facts]
    if open_values:  # up to three values per fact (told, updated or distractor), each fact its own attribute
        pools = {a.name: _distinct(lambda a=a: open_value(a, rng), 3 * args.facts) for a in ATTRIBUTES}
    else:
        pools = {
            a.name: rng.sample(_pool(a.name, a.values, args.split), len(_pool(a.name, a.values, args.split)))
            for a in ATTRIBUTES
        }
    kinds = (["single", "updated", "distractor"] * args.facts)[: args.facts]
    rng.shuffle(kinds)
    facts = []
    for i, (person, attribute, kind) in enumerate(zip(people, attributes, kinds, strict=False)):
        pool = pools[attribute.name]
        if len(pool) < 2:
            raise ValueError(
                f"synthetic: too many facts per episode for the {attribute.name!r} pool; lower --facts"
            )
        value = pool.pop()
        if i < own:  # the user's own fact, in the first person
            tells, updates, distracts = SELF_TEMPLATES[attribute.name]
            tell = rng.choice(tells).format(value=value)
            asked = rng.choice((person, person.split()[0]))  # by full name or first name
        else:
            tells, updates, distracts = attribute.tell, attribute.update, attribute.distract
            intro = f"my {rng.choice(RELATIONS)} {person}"
            tell = rng.choice(tells).format(who=intro, value=value)
            asked = person
        if kind == "updated":
            told_at = rng.uniform(0.0, 0.6)
            new_value = pool.pop()
            planned.append(PlannedTurn(told_at, _sentence(rng.choice(OPENERS), tell), f"{i}:tell", by))
            update = rng.choice(updates).format(who=person, value=new_value)
            planned.append(
                PlannedTurn(
                    rng.uniform(told_at + 0.2, 1.0), _sentence(rng.choice(OPENERS), update), f"{i}:answer", by
                )
            )
            facts.append((i, asked, attribute, new_value, kind))
        else:
            planned.append(
                PlannedTurn(rng.uniform(0.0, 1.0), _sentence(rng.choice(OPENERS), tell), f"{i}:answer", by)
            )
            if kind == "distractor":
                other = pool.pop()
                distract = rng.choice(distracts).format(who=person, value=other)
                planned.append(
                    PlannedTurn(
                        rng.uniform(0.0, 1.0), _sentence(rng.choice(OPENERS), distract), f"{i}:distractor", by
                    )
                )
            facts.append((i, asked, attribute, value, kind))
    filler = filler_turns(args.split, seed=rng.randrange(2**31), data=args.data)
    turns, placed = assemble_history(target_tokens, planned, speakers, filler, count_tokens, rng)
    questions = tuple(
        Question(
            id=f"q{i}",
            question=attribute.question.format(who=person),
            answer=value,
            category=kind,
            evidence=(placed[f"{i}:answer"],),
            aliases=answer_aliases(attribute.name, value),
        )
        for i, person, attribute, value, kind in facts
    )
    episode_id = (
        f"synthetic-{args.split}{'-open' if open_values else ''}{'-names' if open_names else ''}"
        f"{'-user' if as_user else ''}-{target_tokens}-{index}"
    )
    return Episode(episode_id, tuple(turns), questions, meta={"target_tokens": target_tokens})


@register_task(
    "synthetic",
    help="facts about people told across sessions among real chat, some changed later",
    main_metric="contains",
)
def build_synthetic(args: TaskArgs, count_tokens: CountTokens) -> list[Episode]:
    # example-major: a run cut by its time budget has covered every length as far as it got
    return [
        build_episode(args, length, i, count_tokens) for i in range(args.examples) for length in args.lengths
    ]
