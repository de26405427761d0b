"""The Hugging Face callback in a real `transformers.Trainer` on the CPU, with a 2-layer BERT built from a config
(nothing downloaded): what it writes, read back with TensorBoard's loader, against the Trainer's own logs; a run
that diverges, diagnosed; README's snippet as printed."""

import json

import pytest
import torch
from conftest import ROOT, load_events, readme_python, run_script
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from gradwatch.transformers import MonitorCallback


def train(folder, callback, **options):
    """A tiny BERT classifier trained for 2 epochs on 96 random sequences whose class is their first token mod 3."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    ids = torch.randint(3, 64, (96, 12))
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, ids[:, 0] % 3)]
    settings = dict(num_train_epochs=2, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    settings.update(eval_strategy="epoch", logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    args = TrainingArguments(str(folder), report_to=["tensorboard"], **{**settings, **options})
    model = BertForSequenceClassification(config)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:32], callbacks=[callback])
    trainer.train()
    return trainer


def test_gradients_once_per_optimizer_step_beside_the_trainers_own_logs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(run))  # the Trainer's TensorBoard folder: one run
    trainer = train(tmp_path / "out", MonitorCallback(stats_every=1, classes=["a", "b", "c"]), max_grad_norm=1e6)

    trainers = {event.step: event.value for event in load_events(run).Scalars("train/grad_norm")}
    ours = {event.step: event.value for event in load_events(run / "steps").Scalars("grad_norm/total")}
    assert sorted(ours) == sorted(trainers) == list(range(1, 13))  # 2 epochs of 12 batches, 2 per step
    for step, norm in ours.items():
        assert norm == pytest.approx(trainers[step], rel=1e-4)

    epochs = load_events(run)
    for tag in ("bert.encoder.layer.0.attention.self.query.weight_grad", "classifier.bias_data"):
        assert [event.step for event in epochs.Histograms(tag)] == [1, 2]
    assert not [tag for tag in epochs.Tags()["histograms"] if tag.startswith(("module.", "_orig_mod."))]
    assert "eval/loss" in epochs.Tags()["scalars"]
    saved = json.loads((run / "diagnosis.json").read_text())
    assert saved["findings"] == []
    # the loss's graph, from the loss the model returned (the Trainer hands the callback none), where it is made
    [loss] = saved["facts"]["loss"]["losses"]
    assert loss["function"] == "cross_entropy" and "modeling_bert.py:" in loss["line"]
    assert saved["facts"]["objective"] == "a loss to minimise"  # the loss the model returns is among its outputs
    assert loss["target"]["max"] <= 2 and saved["facts"]["loss"]["reached"] == len(list(trainer.model.parameters()))


def test_a_learning_rate_far_too_high_is_named_first(tmp_path, capsys):
    train(tmp_path, MonitorCallback(log_dir=tmp_path / "run", stats_every=1), learning_rate=30.0, max_grad_norm=0)
    findings = json.loads((tmp_path / "run" / "diagnosis.json").read_text())["findings"]
    assert findings[0]["rule"] == "diverging"
    # a tenth of the rate set, not of the rate the Trainer's linear schedule had decayed to (27.5 read "2.75")
    assert "(to 3 or less, a tenth of the 30 set)" in findings[0]["suggestion"]
    out = capsys.readouterr().out  # the story, printed at the end on a line of its own (not after tqdm's bar)
    told = f"\ngradwatch: the diagnosis (in full in {tmp_path / 'run' / 'diagnosis.json'}):\n  Problem, epoch 1-2"
    assert told in out and "the training loss rose from" in out, out[-1500:]


def test_the_readme_snippet_runs_as_printed(tmp_path):
    (tmp_path / "snippet.py").write_text(readme_python("#### A Hugging Face example"))
    result = run_script(tmp_path / "snippet.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "hf-out" / "runs" / "tiny-bert"
    assert [event.step for event in load_events(run).Histograms("classifier.weight_grad")] == [1, 2, 3]
    assert "eval/loss" in load_events(run).Tags()["scalars"]  # the Trainer's own logs, in the same run
    assert isinstance(json.loads((run / "diagnosis.json").read_text())["findings"], list)


def test_with_torch_compile_the_activations_are_measured_inside_the_graph(tmp_path):
    callback = MonitorCallback(log_dir=tmp_path / "run", stats_every=2)
    train(tmp_path, callback, torch_compile=True, torch_compile_backend="aot_eager")
    steps = load_events(tmp_path / "run" / "steps")
    # every 2 steps, and step 1 (the first after watch())
    assert [e.step for e in steps.Scalars("saturated_share/bert.pooler.activation")] == [1, *range(2, 13, 2)]
    assert {"grad_norm/bert.embeddings.word_embeddings.weight", "loss"} <= set(steps.Tags()["scalars"])  # own names


# The Trainer leaves the process group to the script. Without destroy_process_group() at the end, torch 2.14.1 with
# gloo aborts a process that exits while the other still runs ("terminate called without an active exception"):
# 2 of 25 runs of this script, 2 of 10 with no monitor and rank 0 sleeping 3 s at the end; 0 of 30 with it.
DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_transformers import train
from gradwatch.transformers import MonitorCallback
train({out!r}, MonitorCallback(log_dir={run!r}), ddp_backend="gloo")
torch.distributed.destroy_process_group()
"""


def test_under_torchrun_only_the_main_process_writes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        DDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "out"), run=str(tmp_path / "run"))
    )
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("No findings.") == 1  # the story, told once
    for folder in (tmp_path / "run", tmp_path / "run" / "steps"):
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    histograms = load_events(tmp_path / "run").Tags()["histograms"]
    assert "classifier.weight_grad" in histograms and not [tag for tag in histograms if tag.startswith("module.")]


class Endless(torch.utils.data.IterableDataset):
    """Random sequences whose class is their first token mod 3, without end: a run counted in max_steps."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(3, 64, (12,), generator=generator)
            yield {"input_ids": ids, "labels": ids[0] % 3}


def test_a_max_steps_run_is_diagnosed_in_windows_of_steps_while_it_trains(tmp_path):
    """An endless dataset and max_steps: the Trainer's one epoch ends only with the run, so the monitor
    diagnoses windows of steps as it trains (each summary logged when it was diagnosed), then the epoch."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)  # fmt: skip
    args = TrainingArguments(str(tmp_path / "out"), max_steps=600, per_device_train_batch_size=8, logging_steps=50,
                             save_strategy="no", use_cpu=True, disable_tqdm=True, report_to=[])  # fmt: skip
    callback = MonitorCallback(log_dir=tmp_path / "run", stats_every=10)
    model = BertForSequenceClassification(config)
    Trainer(model=model, args=args, train_dataset=Endless(), callbacks=[callback]).train()
    lines = (tmp_path / "run" / "gradwatch-summaries.jsonl").read_text().splitlines()
    summaries = [json.loads(line)["summary"] for line in lines[:-1]]
    assert [(s["unit"], s["step"]) for s in summaries] == [("steps", 260), ("steps", 520), ("epoch", 600)]
    assert json.loads(lines[-1])["ended"] == {"epoch": 0, "step": 600}  # the run's end: the Trainer's close()
