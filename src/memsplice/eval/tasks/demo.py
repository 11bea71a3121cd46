"""The scripted multi-session demo as a task: one person's facts told in early sessions, small talk in between, a fact
that changes later, and questions in a last session.

Small talk comes from the chit-chat dialogues shipped in the package (`memsplice.data.bundled_dialogues`), so the
task needs no corpus directory. `memsplice demo` runs it; `memsplice eval --task demo` scores it like any task.
"""

from __future__ import annotations

from memsplice.data import bundled_dialogues

from .base import CountTokens, Episode, Question, TaskArgs, Turn, register_task

SESSIONS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "Monday 3 March, 09:12",
        [
            ("user", "Hi! I'm Priya Raman. I just started using this assistant."),
            ("assistant", "Welcome, Priya! Tell me anything you'd like me to remember."),
            ("user", "I live in Porto and I work as a marine biologist at the aquarium."),
            ("assistant", "Porto and marine biology, noted."),
            ("user", "My cat is called Miso. She is three years old."),
            ("assistant", "Miso sounds lovely."),
        ],
    ),
    ("Wednesday 5 March, 18:40", []),  # small talk only
    (
        "Saturday 15 March, 11:05",
        [
            ("user", "Big news: I moved from Porto to Lyon last week."),
            ("assistant", "Congratulations on the move to Lyon!"),
            ("user", "Also, my sister Ana's birthday is on 9 September. Remind me to plan something."),
            ("assistant", "Ana's birthday, 9 September. I'll remember."),
        ],
    ),
    ("Tuesday 18 March, 20:30", []),  # small talk only
]

QUESTIONS: list[tuple[str, str, str, tuple[str, ...]]] = [
    # (question, answer, category, aliases)
    ("Which city does Priya live in now?", "Lyon", "updated", ()),
    ("What is the name of Priya's cat?", "Miso", "single", ()),
    ("What is Priya's job?", "marine biologist", "single", ("biologist",)),
    ("When is Ana's birthday?", "9 September", "single", ("September 9", "September 9th", "9th September")),
]


def _small_talk(turns_per_session: int, offset: int) -> list[tuple[str, str]]:
    dialogues = bundled_dialogues()
    lines: list[tuple[str, str]] = []
    for d in dialogues[offset:]:
        for speaker, text in d.turns:
            lines.append(("user" if speaker == "A" else "assistant", " ".join(text.split())))
            if len(lines) >= turns_per_session:
                return lines
    return lines


def build_demo_episode(small_talk_turns: int = 12) -> Episode:
    turns: list[Turn] = []
    evidence: dict[str, str] = {}
    for session, (date, scripted) in enumerate(SESSIONS, start=1):
        lines = scripted or _small_talk(small_talk_turns, offset=session * 7)
        for i, (speaker, text) in enumerate(lines):
            turn = Turn(id=f"S{session}:{i}", speaker=speaker, text=text, session=session, date=date)
            turns.append(turn)
            for key in ("Lyon", "Miso", "marine biologist", "9 September"):
                if key in text and speaker == "user":
                    evidence.setdefault(key, turn.id)
    questions = tuple(
        Question(id=f"Q{i}", question=q, answer=a, category=c, evidence=(evidence[a],), aliases=aliases)
        for i, (q, a, c, aliases) in enumerate(QUESTIONS)
    )
    return Episode("demo", tuple(turns), questions, meta={"sessions": len(SESSIONS)})


@register_task(
    "demo",
    help="the scripted multi-session demo: facts told early, asked about later",
    main_metric="contains",
)
def build_demo(args: TaskArgs, count_tokens: CountTokens) -> list[Episode]:
    return [build_demo_episode()]
