"""A deterministic synthetic support corpus for a fictional company, so a fresh machine needs no download.

Everything derives from one table of facts (products × plans × prices, storage, trials, support hours,
troubleshooting steps) drawn from `seed`. The pretraining corpus states these facts as FAQ pages,
product overviews, troubleshooting guides and support dialogues. The SFT pairs ask about the same
facts with short answers of one fixed form per topic: training pairs use one set of question
phrasings, evaluation pairs use held-out phrasings of the same facts, so a fine-tuned model can only
score better on them by having learned the facts and the answer form, not by memorising questions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.config import DemoCorpusConfig

COMPANY = "Nimbus Works"
FORMAT_VERSION = 1

PRODUCTS = {
    "CloudDesk": ("a shared online workspace", "edit documents with your team in real time"),
    "PhotoVault": ("a photo backup app", "back up every photo from your phone automatically"),
    "TaskPilot": ("a task planner", "plan projects on boards and get reminders before deadlines"),
    "MailWave": ("an email marketing tool", "send newsletters and see who opened them"),
    "SecureSync": (
        "an encrypted file sync service",
        "keep files in sync across devices with end-to-end encryption",
    ),
    "BudgetBee": ("a budgeting app", "track spending by category and set monthly savings goals"),
}
PLANS = ("Basic", "Pro", "Team")
PRICE_RANGES = {"Basic": (3, 9), "Pro": (10, 25), "Team": (26, 60)}
STORAGE_CHOICES = {"Basic": (5, 10, 20), "Pro": (50, 100, 200), "Team": (500, 1000, 2000)}
TRIAL_DAYS = (7, 14, 30)
SUPPORT_HOURS = (
    "around the clock by live chat",
    "on weekdays from 9am to 5pm by email",
    "every day from 8am to 8pm by phone",
    "on weekdays from 8am to 6pm by live chat",
)
# issue key: (how a customer says it, how the answer names it, steps that fit it)
ISSUES = {
    "login": (
        "I cannot log in to {p}",
        "login problems",
        ("reset your password from the sign-in page", "sign out on all devices and sign in again"),
    ),
    "sync": (
        "{p} is stuck syncing",
        "stuck syncing",
        ("pause sync and resume it from the status menu", "check your connection and restart the app"),
    ),
    "crash": (
        "{p} crashes when it starts",
        "crashes on start",
        ("update the app to the latest version", "clear the app cache in Settings"),
    ),
    "payment": (
        "my payment for {p} was declined",
        "declined payments",
        ("update your card details under Billing", "contact your bank to allow the charge"),
    ),
    "notify": (
        "{p} stopped sending notifications",
        "missing notifications",
        ("turn notifications back on in Settings", "allow notifications for the app in your phone settings"),
    ),
}

# topic: (answer template, training question phrasings, held-out evaluation phrasings)
QA = {
    "price": (
        "The {plan} plan of {p} costs ${price} per month.",
        (
            "How much does the {plan} plan of {p} cost?",
            "What is the price of {p} {plan}?",
            "What does {p} {plan} cost per month?",
            "How much is the {plan} plan for {p}?",
        ),
        (
            "I want {p} on the {plan} plan. What will I pay each month?",
            "Tell me the monthly price of {p} {plan}.",
        ),
    ),
    "storage": (
        "The {plan} plan of {p} includes {storage} GB of storage.",
        (
            "How much storage does {p} {plan} include?",
            "What is the storage limit of the {plan} plan of {p}?",
            "How many GB do I get with {p} {plan}?",
            "How much space comes with the {plan} plan of {p}?",
        ),
        ("On the {plan} plan of {p}, how much can I store?", "What storage cap does {p} {plan} have?"),
    ),
    "trial": (
        "{p} comes with a {days}-day free trial.",
        (
            "Does {p} have a free trial?",
            "How long is the {p} free trial?",
            "Can I try {p} for free?",
            "How many days is the trial of {p}?",
        ),
        ("Before paying for {p}, how long can I test it?", "What trial period does {p} offer?"),
    ),
    "support": (
        "{p} support is available {hours}.",
        (
            "When is {p} support available?",
            "How can I reach {p} support?",
            "What are the support hours for {p}?",
            "How do I contact {p} support?",
        ),
        ("If I need help with {p}, when can I get it?", "When can I talk to someone about {p}?"),
    ),
    "about": (
        "{p} is {desc} that lets you {feature}.",
        ("What does {p} do?", "What is {p} for?", "Tell me what {p} is.", "What is the main feature of {p}?"),
        ("Why would I use {p}?", "Can you describe {p} briefly?"),
    ),
    "fix": (
        "To fix {issue_name} in {p}, {step}.",
        ("{q}. What should I do?", "{q}. How do I fix it?", "Help, {q}.", "{q}. Can you help?"),
        ("{q} again. Any advice?", "What do you suggest? {q}."),
    ),
}

NAMES = ("Alex", "Sam", "Priya", "Jordan", "Mei", "Omar", "Lucia", "Ken", "Fatima", "Noah", "Ines", "Tom")
GREETINGS = ("Hi", "Hello", "Hey there", "Good morning", "Good afternoon")
OPENERS = ("Thanks for contacting {c} support.", "Welcome to {c} support.", "Thanks for reaching out to {c}.")
CLOSINGS = (
    "Is there anything else I can help with?",
    "Let me know if that helps.",
    "Have a great day!",
    "Happy to help any time.",
)


@dataclass(frozen=True)
class DemoFiles:
    corpus: Path  # jsonl of {"text"}
    sft_train: Path  # jsonl of {"prompt", "response"}
    sft_eval: Path  # jsonl of {"prompt", "response"}, held-out phrasings of the same facts


def make_facts(seed: int) -> dict[str, dict]:
    """The fact table every document and pair is generated from."""
    rng = random.Random(f"facts-{seed}")
    facts = {}
    for p, (desc, feature) in PRODUCTS.items():
        facts[p] = {
            "desc": desc,
            "feature": feature,
            "price": {plan: rng.randint(*PRICE_RANGES[plan]) for plan in PLANS},
            "storage": {plan: rng.choice(STORAGE_CHOICES[plan]) for plan in PLANS},
            "days": rng.choice(TRIAL_DAYS),
            "hours": rng.choice(SUPPORT_HOURS),
            "steps": {key: rng.choice(steps) for key, (_, _, steps) in ISSUES.items()},
        }
    return facts


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]


def qa_items(facts: dict[str, dict]) -> list[tuple[str, dict, str]]:
    """Every (topic, template values, answer) the facts support: one item per fact."""
    items = []
    for p, f in facts.items():
        base = {"p": p, "desc": f["desc"], "feature": f["feature"], "days": f["days"], "hours": f["hours"]}
        for plan in PLANS:
            values = {**base, "plan": plan, "price": f["price"][plan], "storage": f["storage"][plan]}
            items.append(("price", values, QA["price"][0].format(**values)))
            items.append(("storage", values, QA["storage"][0].format(**values)))
        for topic in ("trial", "support", "about"):
            items.append((topic, base, QA[topic][0].format(**base)))
        for key, (q, issue_name, _) in ISSUES.items():
            values = {**base, "q": q.format(p=p), "issue_name": issue_name, "step": f["steps"][key]}
            items.append(("fix", values, QA["fix"][0].format(**values)))
    return items


def _pairs(items, which: int, phrasing: int | None = None) -> list[dict[str, str]]:
    """(question, answer) pairs using the training (which=1) or held-out (which=2) phrasings, or only
    phrasing number `phrasing` of each topic."""
    return [
        {"prompt": _capital(template.format(**values)), "response": answer}
        for topic, values, answer in items
        for k, template in enumerate(QA[topic][which])
        if phrasing is None or k == phrasing
    ]


def _faq_page(rng: random.Random, p: str, items) -> str:
    mine = [it for it in items if it[1]["p"] == p]
    chosen = rng.sample(mine, k=min(len(mine), rng.randint(3, 6)))
    lines = [rng.choice((f"{p} FAQ", f"Frequently asked questions about {p}", f"{COMPANY} help center: {p}"))]
    for topic, values, answer in chosen:
        question = _capital(rng.choice(QA[topic][1]).format(**values))
        lines.append(f"Q: {question}\nA: {answer}")
    return "\n\n".join(lines)


def _overview(rng: random.Random, p: str, f: dict) -> str:
    plans = [
        f"the {plan} plan costs ${f['price'][plan]} per month with {f['storage'][plan]} GB of storage"
        for plan in PLANS
    ]
    rng.shuffle(plans)
    intro = rng.choice(
        (
            f"{p} is {f['desc']} from {COMPANY}.",
            f"{COMPANY} makes {p}, {f['desc']}.",
            f"Meet {p}, {f['desc']}.",
        )
    )
    return (
        f"{intro} It lets you {f['feature']}. Pricing: {'; '.join(plans)}. "
        f"New users get a {f['days']}-day free trial, and support is available {f['hours']}."
    )


def _guide(rng: random.Random, p: str, f: dict) -> str:
    keys = rng.sample(list(ISSUES), k=rng.randint(2, len(ISSUES)))
    lines = [
        rng.choice((f"Troubleshooting {p}", f"{p} troubleshooting guide", f"Fixing common {p} problems"))
    ]
    for key in keys:
        problem = ISSUES[key][0].format(p=p).replace("I cannot", "you cannot").replace("my ", "your ")
        lines.append(f"If {problem}: {f['steps'][key]}.")
    return "\n".join(lines)


def _dialogue(rng: random.Random, ticket: int, items) -> str:
    name = rng.choice(NAMES)
    turns = [f"Ticket #{ticket}", f"Customer: {rng.choice(GREETINGS)}, this is {name}."]
    turns.append(f"Agent: {rng.choice(GREETINGS)} {name}! {rng.choice(OPENERS).format(c=COMPANY)}")
    for topic, values, answer in rng.sample(items, k=rng.randint(1, 3)):
        turns.append(f"Customer: {_capital(rng.choice(QA[topic][1]).format(**values))}")
        turns.append(f"Agent: {answer}")
    turns.append(f"Agent: {rng.choice(CLOSINGS)}")
    return "\n".join(turns)


def corpus_documents(cfg: DemoCorpusConfig) -> list[str]:
    facts = make_facts(cfg.seed)
    items = qa_items(facts)
    rng = random.Random(f"corpus-{cfg.seed}")
    docs = []
    products = list(PRODUCTS)
    for i in range(cfg.num_documents):
        p = products[i % len(products)]
        kind = rng.random()
        if kind < 0.45:
            docs.append(_dialogue(rng, 10_000 + i, items))
        elif kind < 0.7:
            docs.append(_faq_page(rng, p, items))
        elif kind < 0.85:
            docs.append(_overview(rng, p, facts[p]))
        else:
            docs.append(_guide(rng, p, facts[p]))
    return docs


def sft_pairs(cfg: DemoCorpusConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training pairs, evaluation pairs).

    Training pairs go round by round, one phrasing of every fact per round (shuffled within the round),
    so even a small num_sft_pairs covers every fact before repeating one. Evaluation pairs use the
    held-out phrasings, once each, only for facts the training pairs teach (at most num_sft_pairs).
    """
    items = qa_items(make_facts(cfg.seed))
    rng = random.Random(f"sft-{cfg.seed}")
    rounds = [_pairs(items, 1, k) for k in range(len(QA["price"][1]))]
    train: list[dict[str, str]] = []
    while len(train) < cfg.num_sft_pairs:
        for pairs in rounds:
            rng.shuffle(pairs)
            train.extend(pairs[: cfg.num_sft_pairs - len(train)])
    taught = {p["response"] for p in train}
    held_out = [p for p in _pairs(items, 2) if p["response"] in taught]
    rng.shuffle(held_out)
    return train, held_out[: cfg.num_sft_pairs]


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_demo_corpus(cfg: DemoCorpusConfig, out_dir: str | Path) -> DemoFiles:
    """Write corpus.jsonl, sft_train.jsonl, sft_eval.jsonl under out_dir (skipped when already current,
    so file times stay put and downstream caches keyed on them stay valid)."""
    out = Path(out_dir)
    files = DemoFiles(out / "corpus.jsonl", out / "sft_train.jsonl", out / "sft_eval.jsonl")
    stamp = out / "demo.json"
    want = {"version": FORMAT_VERSION, "config": cfg.model_dump(mode="json")}
    if stamp.is_file() and all(p.is_file() for p in (files.corpus, files.sft_train, files.sft_eval)):
        try:
            if json.loads(stamp.read_text()) == want:
                return files
        except ValueError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(files.corpus, ({"text": d} for d in corpus_documents(cfg)))
    train, held_out = sft_pairs(cfg)
    _write_jsonl(files.sft_train, train)
    _write_jsonl(files.sft_eval, held_out)
    stamp.write_text(json.dumps(want, sort_keys=True))
    return files
