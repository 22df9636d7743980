"""The counts docs/latent_actions.md states for its demo ablation are what its command yields:
the pairs and videos `make ablation-demo` scores and probes, recomputed from the pair selection
on the data `make demo` makes (no model is trained here)."""
import os
import re
from types import SimpleNamespace

import pytest

from conftest import ROOT


def number(text):
    return int(text.replace(",", ""))


def makefile_comparison():
    """compare_with_laq.py's pair options in the Makefile's ablation-demo recipe."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = text[text.index("ablation-demo:"):]
    line = recipe[recipe.index("compare_with_laq.py"):recipe.index("--output compare_ablation")]

    def value(flag):
        return re.search(rf"{flag} (\S+)", line).group(1)
    return SimpleNamespace(offset=int(value("--offset")), pairs=value("--pairs"),
                           num_pairs=int(value("--num-pairs")),
                           probe_pairs=int(value("--probe-pairs")), seed=0,
                           index_cache_dir="", keep_identity_pairs="--keep-identity-pairs" in line)


@pytest.mark.slow
def test_the_ablations_counts_are_what_its_command_yields(tmp_path):
    from config import load_config
    from make_demo_data import make_demo_data
    from pairs import choose, is_identity, split_pairs
    doc = open(os.path.join(ROOT, "docs", "latent_actions.md")).read()
    scored = re.search(r"([\d,]+) val pairs of (\d+) videos", doc)
    probe = re.search(r"probe ([\d,]+) train pairs of (\d+) videos → ([\d,]+) val pairs of "
                      r"(\d+) videos", doc)
    assert scored and probe, "the ablation's caption no longer states its counts"

    data = str(tmp_path / "demo")
    make_demo_data(data)                                       # make demo's data, as made
    args = makefile_comparison()
    args.data_path = data
    config = load_config(os.path.join(ROOT, "configs", "latent_action_demo.yaml"),
                         check_paths=False).to_dict()

    def drawn(split, n, seed):
        pairs, positions, _, _ = split_pairs(args, config, split)
        chosen = choose(pairs, positions, n, seed, args.pairs)
        return [p for p in chosen if args.keep_identity_pairs or not is_identity(p)]

    val = drawn("val", args.num_pairs, args.seed)
    assert (len(val), len({p.video for p in val})) == (number(scored[1]), number(scored[2]))
    train, test = drawn("train", args.probe_pairs, 1), drawn("val", args.probe_pairs, 2)
    assert (len(train), len({p.video for p in train}), len(test), len({p.video for p in test})) \
        == tuple(number(probe[k]) for k in range(1, 5))
