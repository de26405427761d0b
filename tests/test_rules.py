"""The rules' declarations: README's table against them, what a declaration alone gives a new rule, and the
learning rate the suggestions start from."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn
from conftest import ROOT

from gradwatch import Thresholds, TrainingMonitor, diagnose
from gradwatch import diagnosis as rules_module
from gradwatch.diagnosis import LOWER, RULES, Rule, record, rule, story
from gradwatch.stats import learning_rate
from gradwatch.summary import EpochSummary


def table_rows(path, header):
    """{rule: its second cell}, in the order of the table that begins with `header` in `path`."""
    text = (ROOT / path).read_text()
    table = text[text.index(header) :].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    return {row[0].strip("| `[").split("`")[0]: row[1] for row in rows}


def readme_rule_rows():
    """{rule: its 'fires when' cell}, in the order of the table of docs/diagnosis.md."""
    return table_rows("docs/diagnosis.md", "| rule | fires when")


def test_readme_names_every_rule_in_order_with_a_link_to_its_thresholds():
    rows = table_rows("README.md", "| rule | what it finds")
    assert list(rows) == list(RULES) and all(cell.strip() for cell in rows.values())
    assert (ROOT / "README.md").read_text().count("](docs/diagnosis.md#the-rules)") == len(RULES)


def test_readme_lists_every_declared_rule_in_order_with_the_thresholds_it_reads():
    rows = readme_rule_rows()
    assert list(rows) == list(RULES)
    for name, declaration in RULES.items():
        named = set(re.findall(r"`([a-z_]+)`", rows[name])) & set(Thresholds.names())
        assert named == set(declaration.thresholds), name


def test_every_declaration_is_whole():
    read = {threshold for declaration in RULES.values() for threshold in declaration.thresholds}
    assert read == set(Thresholds.names())  # no threshold that no rule reads
    for name, declaration in RULES.items():
        assert declaration.check.__name__ == name and declaration.when, name  # named after it, with a docstring
        assert set(declaration.follows) <= set(RULES) - {name}, name
        assert (declaration.lr == 0) == (declaration.instead is None), name
    with pytest.raises(ValueError, match="no such threshold"):
        Rule("typo", lambda history, t: [], "try", thresholds=("stuck_epoch",))


@pytest.fixture
def rules_kept():
    """RULES as they were, after a test that declares a rule."""
    kept = dict(RULES)
    yield
    RULES.clear()
    RULES.update(kept)


def test_a_declaration_is_all_a_new_rule_needs(tmp_path, rules_kept):
    """A rule declared in a few lines runs live, goes into diagnosis.json and the story with its suggestion,
    is told as the consequence of the divergence it follows from, and is judged parameter by parameter."""

    @rule("scale the inputs down.", thresholds=("weight_max_abs",), follows=("diverging",), per_parameter=True)
    def huge_weights(history, t):
        """A weight tensor's max |w| is above 100 x `weight_max_abs`."""
        now = history[-1]
        layers = now.layers.items()
        found = [n for n, s in layers if s.get("max_abs_weight", 0) > 100 * t.weight_max_abs]
        return [rules_module._found(now, [n], {}, f"{n} is huge.") for n in found]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)
    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as monitor:
        for epoch in range(2):
            for _ in range(8):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(torch.randn(16, 4) * 10), torch.randint(0, 2, (16,)))
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {})
    huge = [f for f in monitor.findings if f.rule == "huge_weights"]
    assert huge and all(f.id == f"huge_weights:{f.parameters[0]}" for f in huge)  # one per parameter
    assert all(f.cause == "diverging" and f.suggestion is None for f in huge)
    saved = json.loads((tmp_path / "diagnosis.json").read_text())["findings"]
    assert {item["rule"] for item in saved} >= {"diverging", "huge_weights"}
    assert "huge_weights" in monitor.story()
    alone = rules_module.RULES["huge_weights"]([EpochSummary(0, 5, {"w": {"max_abs_weight": 1e3}})], Thresholds())
    assert [(f.rule, f.suggestion) for f in alone] == [("huge_weights", "scale the inputs down.")]
    assert "Try: scale the inputs down." in story(record([], alone, 0)[0])  # the root: its own suggestion


def test_the_suggestions_start_from_the_rate_most_parameters_train_with(tmp_path):
    """With a first parameter group ten times the run's rate (--layer-lr conv1=10), 'lower the learning rate'
    names a tenth of the run's rate, not of conv1's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    first = list(model[0].parameters())
    rest = [p for layer in (model[2], model[4]) for p in layer.parameters()]
    groups = [{"params": first, "lr": 50.0}, {"params": rest}]
    optimizer = torch.optim.SGD(groups, lr=5.0)
    assert learning_rate(optimizer) == 50.0  # the first layer holds 84 of the 124 values
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 4))
    groups = [{"params": list(model[0].parameters()), "lr": 50.0}]
    groups.append({"params": [p for layer in (model[2], model[4]) for p in layer.parameters()]})
    optimizer = torch.optim.SGD(groups, lr=5.0)
    assert learning_rate(optimizer) == 5.0 and learning_rate(None) is None
    with TrainingMonitor(tmp_path, stats_every=4).watch(model, optimizer) as monitor:
        for _ in range(16):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(torch.randn(32, 4)), torch.randint(0, 4, (32,)))
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(0, {}, classes=list("abcd"))
    diverging = next(f for f in monitor.findings if f.rule == "diverging")
    assert "lower the learning rate at least ten times (to 0.5 or less, a tenth of the 5 set)" in diverging.suggestion


def test_a_rule_reads_summaries_and_the_dicts_of_earlier_states():
    window = {"first": 1, "step": 10, "mean": 9.0, "max": 9.0, "max_step": 10, "nonfinite_step": None}  # no median
    summary = EpochSummary(0, 10, losses=[window], num_classes=4)  # an untrained model's loss: ln 4
    summary.first_loss = math.log(4)
    as_dict = {key: value for key, value in summary.to_dict().items() if key != "output_bias"}  # an older state
    assert [f.rule for f in diagnose([summary])] == [f.rule for f in diagnose([as_dict])] == ["diverging"]
    assert diagnose([summary])[0].suggestion.startswith("lower the learning rate at least ten times;")  # no lr
    assert RULES["diverging"].lr == LOWER and RULES["diverging"].diverged
