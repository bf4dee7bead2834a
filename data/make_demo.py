"""Write the small demo data set in data/demo/ (run: python data/make_demo.py [out_dir]).

`python train.py --demo` trains on it: a few hundred sentences in the official E2E
CSV format (`mr,ref`, one row per reference, several references per MR), so the whole
pipeline runs in a minute on a laptop without downloading anything. Every restaurant,
landmark and sentence pattern here is made up for this project; none of it is copied
from the E2E data set. The output depends only on SEED, so re-running this script
reproduces the committed files byte for byte (tests/test_data.py checks that).
"""
from __future__ import annotations

import csv
import io
import random
import sys
from pathlib import Path

from lora_min.fileio import atomic_write_text

SEED = 2021
N_TRAIN_MRS, N_DEV_MRS, N_TEST_MRS = 130, 40, 40

NAMES = ["The Copper Kettle", "Blue Heron", "The Lantern Room", "Saffron Court", "The Old Mill",
         "Juniper", "The Quay House", "Little Olive", "The Foundry", "Marigold", "The Salt Cellar",
         "Harbour Lights", "The Painted Door", "Wild Thyme", "The Gilded Fig", "Riverbank Table"]
LANDMARKS = ["the Corn Exchange", "Market Square", "the Botanic Garden", "St Anne's Church",
             "the Museum of Maps", "the Old Station", "the Clock Tower", "Weavers Bridge"]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["Italian", "Thai", "Greek", "Mexican", "Japanese", "Spanish", "vegetarian", "seafood"]
PRICES = ["cheap", "moderate", "high"]
RATINGS = ["low", "average", "high"]
AREAS = ["riverside", "city centre", "old town"]
# Slot order as in the official MRs.
SLOTS = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]

# Several phrasings per slot value, so that the references for one MR differ.
PRICE_PHRASES = {"cheap": ["has low prices", "is cheap", "is easy on the wallet"],
                 "moderate": ["is moderately priced", "has average prices", "costs a moderate amount"],
                 "high": ["is expensive", "has high prices", "is at the pricey end"]}
RATING_PHRASES = {"low": ["has a low customer rating", "is rated poorly by customers"],
                  "average": ["has an average customer rating", "is rated average by diners"],
                  "high": ["has a high customer rating", "is rated highly by customers"]}
AREA_PHRASES = {"riverside": ["by the river", "on the riverside"],
                "city centre": ["in the city centre", "in the centre of town"],
                "old town": ["in the old town", "in the historic old town"]}
FAMILY_PHRASES = {"yes": ["is family friendly", "welcomes children", "is a good choice for families"],
                  "no": ["is not family friendly", "is for adults only", "does not welcome children"]}


def random_mr(rng: random.Random) -> dict[str, str]:
    """A name plus two to six other slots with random values."""
    values = {"eatType": rng.choice(EAT_TYPES), "food": rng.choice(FOODS),
              "priceRange": rng.choice(PRICES), "customer rating": rng.choice(RATINGS),
              "area": rng.choice(AREAS), "familyFriendly": rng.choice(["yes", "no"]),
              "near": rng.choice(LANDMARKS)}
    chosen = rng.sample(sorted(values), rng.randint(2, 6))
    return {"name": rng.choice(NAMES), **{slot: values[slot] for slot in chosen}}


def mr_text(mr: dict[str, str]) -> str:
    return ", ".join(f"{slot}[{mr[slot]}]" for slot in SLOTS if slot in mr)


def realise(mr: dict[str, str], rng: random.Random) -> str:
    """One reference text: an opening sentence, then the remaining facts in random order."""
    kind = mr.get("eatType", "place")
    described = f"{mr['food']} {kind}" if "food" in mr else kind
    a_kind = ("an " if described[0].lower() in "aeiou" else "a ") + described
    where = []
    if "area" in mr:
        where.append(rng.choice(AREA_PHRASES[mr["area"]]))
    if "near" in mr:
        where.append(rng.choice([f"near {mr['near']}", f"close to {mr['near']}"]))
    opening = rng.choice([f"{mr['name']} is {a_kind}", f"There is {a_kind} called {mr['name']}"])
    opening = " ".join([opening] + where) + "."

    facts = []
    if "priceRange" in mr:
        facts.append(rng.choice(PRICE_PHRASES[mr["priceRange"]]))
    if "customer rating" in mr:
        facts.append(rng.choice(RATING_PHRASES[mr["customer rating"]]))
    if "familyFriendly" in mr:
        facts.append(rng.choice(FAMILY_PHRASES[mr["familyFriendly"]]))
    rng.shuffle(facts)
    if not facts:
        return opening
    subject = rng.choice(["It", f"The {kind}", mr["name"]])
    body = facts[0] if len(facts) == 1 else ", ".join(facts[:-1]) + " and " + facts[-1]
    return f"{opening} {subject} {body}."


def csv_text(rows: list[tuple[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["mr", "ref"])
    writer.writerows(rows)
    return out.getvalue()


def make_demo(out_dir: Path) -> None:
    rng = random.Random(SEED)
    mrs: dict[str, dict[str, str]] = {}  # distinct MRs, so no dev/test MR is seen in training
    while len(mrs) < N_TRAIN_MRS + N_DEV_MRS + N_TEST_MRS:
        mr = random_mr(rng)
        mrs.setdefault(mr_text(mr), mr)
    mr_list = list(mrs.values())
    splits = {"trainset.csv": (mr_list[:N_TRAIN_MRS], (1, 4)),
              "devset.csv": (mr_list[N_TRAIN_MRS:N_TRAIN_MRS + N_DEV_MRS], (2, 3)),
              "testset_w_refs.csv": (mr_list[N_TRAIN_MRS + N_DEV_MRS:], (2, 3))}
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, (split_mrs, (lo, hi)) in splits.items():
        rows = []
        for mr in split_mrs:
            refs: list[str] = []
            want, tries = rng.randint(lo, hi), 0
            while len(refs) < want and tries < 50:  # distinct references for one MR
                tries += 1
                ref = realise(mr, rng)
                if ref not in refs:
                    refs.append(ref)
            rows += [(mr_text(mr), ref) for ref in refs]
        atomic_write_text(out_dir / file_name, csv_text(rows))
        print(f"{out_dir / file_name}: {len(split_mrs)} MRs, {len(rows)} references")


if __name__ == "__main__":
    make_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "demo")
