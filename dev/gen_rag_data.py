"""
Make an offline multi-hop QA set (issue 12): invented people, towns, countries, firms, rivers and instruments whose
names are built from syllables, so no pretrained knowledge helps. Each entity gets one paragraph of facts; namesakes
("a cousin of ...", "Upper ...") get distractor paragraphs that share words with the real ones. Questions follow
chains of 1, 2 or 3 facts ("Who leads the country where the birthplace of Tavik Morlen lies?"), about a third each,
in MuSiQue's layout: a decomposition whose later hops say #1, #2 for earlier answers, and paragraphs marked
is_supporting among distractors. Writes corpus.jsonl (id, title, text), train.jsonl and test.jsonl; train and test
ask different questions about the one corpus. Seeded: the same flags write the same bytes.

    python -m dev.gen_rag_data [--out DIR] [--seed 0] [--entities 500] [--train 3000] [--test 300]
"""

import json
import os
import random
from dataclasses import dataclass, field

from nanochat.common import Flags, UserError, check_minimums, get_base_dir, print_result, run_cli

SYLLABLES = ("ka lo mi ren tav or vel dun sek mar bri tho zan fen gar ost lin pe ru sol ther va wen xi bo dre ith "
             "ko lum na quo sa tor ul ve ny ash").split()

# kind: (share of the entities, name pattern, namesake pattern, how a namesake's paragraph ties it to the real one)
KINDS = {
    "person":     (0.40, "{first} {stem}", "{first} {stem}", "a cousin of {real}"),
    "town":       (0.24, "{stem}", "Upper {real}", "a village near {real}"),
    "country":    (0.06, "{stem}{land}", "North {real}", "a neighbour of {real}"),
    "company":    (0.14, "{stem} {firm}", "{stem} {firm}", "a rival of {real}"),
    "river":      (0.08, "{stem} River", "Little {real}", "a stream that feeds {real}"),
    "instrument": (0.08, "{lower} {instrument}", "bass {real}", "a larger cousin of the {real}"),
}
NAME_WORDS = {"land": ["ia", "land", "mark", "ora"],
              "firm": ["Mills", "Works", "Foundry", "Shipping", "Textiles", "Brewery", "Printing"],
              "instrument": ["horn", "lute", "drum", "pipe", "harp", "fiddle"]}
ALIASES = {"country": "Republic of {name}", "river": "{stem}"}  # other accepted answers (rivers: without "River")

# kind: (first sentence, the words for its {0} {1} {2}, how later sentences name the entity; persons: He or She)
INTROS = {
    "person": ("{name}{link} is a {0} {1}, now {2} years old.",
               (["quiet", "famous", "young", "retired", "busy", "cheerful"],
                ["weaver", "surveyor", "painter", "baker", "sailor", "teacher", "clockmaker", "poet", "potter"],
                ["24", "31", "38", "45", "52", "67", "73"]), None),
    "town": ("{name}{link} is a {0} town of about {2} people, known for its {1}.",
             (["small", "busy", "quiet", "hillside", "windy", "walled"],
              ["salt market", "glass workshops", "bell tower", "apple orchards", "stone bridge", "spring fair"],
              ["900", "4,000", "12,000", "30,000", "85,000"]), "The town"),
    "country": ("{name}{link}, officially the Republic of {name}, is a {0} country whose chief export is {1}.",
                (["mountainous", "flat", "forested", "dry", "rainy", "lake-filled"],
                 ["wool", "copper", "tea", "timber", "salt", "glassware"]), "The country"),
    "company": ("{name}{link} is a {0} firm of about {2} workers, best known for its {1}.",
                (["family-owned", "large", "young", "venerable", "struggling", "prosperous"],
                 ["ledgers", "rope", "lamps", "sailcloth", "barrels", "maps"], ["40", "200", "900", "3,000"]), "The firm"),
    "river": ("The {name}{link} is a {0} river about {2} kilometres long, rich in {1}.",
              (["slow", "wide", "cold", "muddy", "clear", "winding"], ["trout", "eels", "reeds", "gravel", "herons"],
               ["80", "210", "450", "1,200"]), "The river"),
    "instrument": ("The {name}{link} is a {0} instrument made of {1}, first played about {2} centuries ago.",
                   (["string", "wind", "brass", "percussion"], ["cedar", "bone", "copper", "reed", "maple"],
                    ["three", "five", "seven", "twelve"]), "It"),
}
# two of these end each paragraph: words that every paragraph of a kind shares, as real encyclopedias do
EXTRAS = {
    "person": ["{ref} keeps bees in a small garden.", "{ref} writes long letters to old friends.",
               "{ref} collects old coins and maps.", "{ref} walks to work every morning, even in winter.",
               "{ref} once won a prize for a wooden model ship."],
    "town": ["{ref} holds a market every week.", "Its old gate was rebuilt after a great fire.",
             "Most of its houses are built of grey stone.", "A long road connects it to the coast."],
    "country": ["{ref} holds elections every five years.", "Its flag shows a white bird on a green field.",
                "Most of its people live near the coast.", "Its winters are long and its summers short."],
    "company": ["{ref} sells most of its goods abroad.", "Its first workshop still stands by the harbour.",
                "{ref} has been run by the same family for decades.", "{ref} trains many young apprentices."],
    "river": ["{ref} floods almost every spring.", "Boats carry grain along its lower course.",
              "Several old mills stand on its banks.", "{ref} freezes over in the coldest winters."],
    "instrument": ["{ref} is mostly played at weddings and fairs.", "Its sound is soft and low.",
                   "Learning to play it well takes many years.", "{ref} is often heard in folk songs."],
}

# relation: (subject kind, object kind, the fact, the single-hop question, the noun phrase when a later hop uses it)
RELATIONS = {
    "born_in":    ("person", "town", "{s} was born in {o}.", "Where was {s} born?", "the birthplace of {s}"),
    "lives_in":   ("person", "town", "{s} now lives in {o}.", "In which town does {s} live?", "the town where {s} lives"),
    "works_for":  ("person", "company", "{s} works for {o}.", "Which company does {s} work for?", "the employer of {s}"),
    "plays":      ("person", "instrument", "{s} plays the {o}.", "Which instrument does {s} play?", None),
    "based_in":   ("company", "town", "{s} is based in {o}.", "Where is {s} based?", "the town where {s} is based"),
    "founded_by": ("company", "person", "{s} was founded by {o}.", "Who founded {s}?", "the founder of {s}"),
    "makes":      ("company", "instrument", "{s} also makes the {o}.", "Which instrument does {s} make?", None),
    "in_country": ("town", "country", "{s} lies in {o}.", "Which country is {s} in?", "the country where {s} lies"),
    "on_river":   ("town", "river", "{s} stands on the {o}.", "Which river flows through {s}?", "the river through {s}"),
    "capital":    ("country", "town", "{s}'s capital is {o}.", "What is the capital of {s}?", "the capital of {s}"),
    "leader":     ("country", "person", "{s} is led by {o}.", "Who leads {s}?", "the leader of {s}"),
    "rises_in":   ("river", "country", "{s} rises in {o}.", "In which country does {s} rise?", "the country where {s} rises"),
}
PARAGRAPHS_PER_QUESTION = 6  # supporting ones plus distractors (MuSiQue has 20, HotpotQA 10)


@dataclass
class Entity:
    id: str
    kind: str
    name: str
    stem: str
    aliases: list
    facts: dict = field(default_factory=dict)  # relation -> Entity


def stem(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def make_name(rng, pattern, taken, first_names, real=None):
    """A name of that pattern that no entity has yet; a namesake's pattern may keep the real one's stem or name."""
    while True:
        s = real.stem if real is not None and "{stem}" in pattern else stem(rng)
        words = {key: rng.choice(values) for key, values in NAME_WORDS.items()}
        name = pattern.format(first=rng.choice(first_names), stem=s, lower=s.lower(), real=real.name if real else "", **words)
        if name not in taken:
            taken.add(name)
            return s, name


def make_entities(rng, n):
    """n real entities across the kinds, each with one object per relation of its kind (a capital lies in its country)."""
    first_names = sorted({stem(rng) for _ in range(40)})
    counts = {kind: max(1, round(share * n)) for kind, (share, _, _, _) in KINDS.items()}
    counts["person"] += n - sum(counts.values())  # so that there are n in all
    taken, entities = set(), []
    for kind, (_, pattern, _, _) in KINDS.items():
        for _ in range(counts[kind]):
            s, name = make_name(rng, pattern, taken, first_names)
            aliases = [ALIASES[kind].format(name=name, stem=s)] if kind in ALIASES else []
            entities.append(Entity(f"e{len(entities):04d}", kind, name, s, aliases))
    by_kind = {kind: [e for e in entities if e.kind == kind] for kind in KINDS}
    for e in entities:
        add_facts(rng, e, by_kind)
    return entities, by_kind, first_names


def add_facts(rng, entity, by_kind):
    for relation, (subject, obj, _, _, _) in RELATIONS.items():
        if subject != entity.kind:
            continue
        candidates = by_kind[obj]
        if relation == "capital":  # towns get their country first (kinds are made in that order)
            candidates = [t for t in candidates if t.facts["in_country"] is entity]
        if candidates:  # a country without towns (a namesake's, or in a tiny set) has no capital
            entity.facts[relation] = rng.choice(candidates)


def make_namesakes(rng, entities, by_kind, first_names, n):
    """Distractors: n entities named like real ones, with facts of their own; no question asks about them."""
    taken = {e.name for e in entities}
    namesakes = []
    for real in sorted(rng.sample(entities, n), key=lambda e: e.id):
        _, pattern, namesake, link = KINDS[real.kind]
        s, name = make_name(rng, namesake, taken, first_names, real)
        decoy = Entity(f"d{len(namesakes):04d}", real.kind, name, s, [])
        add_facts(rng, decoy, by_kind)
        namesakes.append((decoy, real, link.format(real=real.name)))
    return namesakes


def paragraph(rng, entity, link=""):
    """Its intro sentence, then its facts in a random order, each naming it by pronoun or 'The town' and so on."""
    intro, words, ref = INTROS[entity.kind]
    ref = ref or rng.choice(("He", "She"))
    sentences = [intro.format(*(rng.choice(w) for w in words), name=entity.name, link=f", {link}," if link else "")]
    facts = [RELATIONS[r][2].format(s=ref, o=o.name) for r, o in entity.facts.items()]
    rng.shuffle(facts)
    return " ".join(sentences + facts + [e.format(ref=ref) for e in rng.sample(EXTRAS[entity.kind], 2)])


def chains(entity, hops):
    """Every chain of `hops` facts from entity as [(subject, relation, object)], no entity met twice."""
    if hops == 0:
        return [[]]
    out = []
    for relation, obj in entity.facts.items():
        for rest in chains(obj, hops - 1):
            if entity not in [obj] + [o for _, _, o in rest]:
                out.append([(entity, relation, obj)] + rest)
    return out


def question(chain):
    """The whole question: the earlier hops nest as noun phrases into the last hop's question."""
    subject = chain[0][0].name
    for _, relation, _ in chain[:-1]:
        subject = RELATIONS[relation][4].format(s=subject)
    return RELATIONS[chain[-1][1]][3].format(s=subject)


def make_row(rng, chain, corpus, near):
    """
    One MuSiQue-layout row: the supporting paragraphs, then as distractors those that share words with them (the
    subjects' namesakes, paragraphs naming a subject), then random ones; shuffled.
    """
    supporting = [s.id for s, _, _ in chain]
    nearby = sorted({p for s in supporting for p in near[s]} - set(supporting))
    others = rng.sample(nearby, min(len(nearby), PARAGRAPHS_PER_QUESTION - len(supporting)))
    while len(supporting) + len(others) < PARAGRAPHS_PER_QUESTION:
        pick = rng.choice(list(corpus))
        if pick not in supporting and pick not in others:
            others.append(pick)
    ids = supporting + others
    rng.shuffle(ids)
    idx = {pid: i for i, pid in enumerate(ids)}
    decomposition = [{"id": f"{s.id}/{relation}",
                      "question": RELATIONS[relation][3].format(s=s.name if hop == 0 else f"#{hop}"),
                      "answer": o.name, "paragraph_support_idx": idx[s.id]}
                     for hop, (s, relation, o) in enumerate(chain)]
    answer = chain[-1][2]
    return {"id": f"{len(chain)}hop__{chain[0][0].id}_" + "_".join(r for _, r, _ in chain),
            "question": question(chain), "question_decomposition": decomposition,
            "paragraphs": [{"idx": idx[p], "title": corpus[p]["title"], "paragraph_text": corpus[p]["text"],
                            "is_supporting": p in supporting} for p in ids],
            "answer": answer.name, "answer_aliases": answer.aliases, "answerable": True}


def split_questions(rng, entities, n_test, n_train):
    """Per hop count, a third of each split from that count's shuffled chains: test first, then train, no overlap."""
    test, train = [], []
    for hops in (1, 2, 3):
        pool = [c for e in entities for c in chains(e, hops)]
        rng.shuffle(pool)
        want_test = n_test // 3 + (hops <= n_test % 3)
        want_train = n_train // 3 + (hops <= n_train % 3)
        if len(pool) < want_test + want_train:
            raise UserError(f"{len(entities)} real entities give only {len(pool)} {hops}-hop questions, fewer than the "
                            f"{want_test + want_train} asked for: raise --entities or lower --train/--test")
        test += pool[:want_test]
        train += pool[want_test:want_test + want_train]
    rng.shuffle(test)
    rng.shuffle(train)
    return test, train


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = Flags(description="Write an offline multi-hop QA set (corpus, train and test questions) in MuSiQue's layout.")
    parser.add_argument("--out", default=None, help="folder (default: $NANOCHAT_BASE_DIR/task_data/rag/synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=500, help="real entities; a third as many namesakes are added")
    parser.add_argument("--train", type=int, default=3000, help="train questions")
    parser.add_argument("--test", type=int, default=300, help="test questions")
    args = parser.parse_args(argv)
    check_minimums(args, {"--entities": 30, "--train": 0, "--test": 0})
    out = args.out or os.path.join(get_base_dir(), "task_data", "rag", "synthetic")

    rng = random.Random(args.seed)
    entities, by_kind, first_names = make_entities(rng, args.entities)
    namesakes = make_namesakes(rng, entities, by_kind, first_names, len(entities) // 3)
    corpus = {e.id: {"id": e.id, "title": e.name, "text": paragraph(rng, e)} for e in entities}
    corpus.update({d.id: {"id": d.id, "title": d.name, "text": paragraph(rng, d, link)} for d, _, link in namesakes})
    near = {e.id: set() for e in entities}  # entity -> the paragraphs that name it, besides its own
    for d, real, _ in namesakes:
        near[real.id].add(d.id)
    for e in entities + [d for d, _, _ in namesakes]:
        for o in e.facts.values():
            near[o.id].add(e.id)
    test, train = split_questions(rng, entities, args.test, args.train)

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"{name}.jsonl") for name in ("corpus", "train", "test")}
    write_jsonl(paths["corpus"], corpus.values())
    hops = {}
    for name, split in (("test", test), ("train", train)):
        write_jsonl(paths[name], [make_row(rng, chain, corpus, near) for chain in split])
        hops[name] = {str(h): sum(len(chain) == h for chain in split) for h in (1, 2, 3)}
    words = [len(p["text"].split()) for p in corpus.values()]
    print_result("gen_rag_data", out=out, **paths, entities=len(entities), distractors=len(namesakes),
                 paragraph_words=[min(words), max(words)], train_questions=len(train), test_questions=len(test),
                 hops=hops)


if __name__ == "__main__":
    run_cli(main)
