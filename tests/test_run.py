"""A run directory's life as library calls (run.py), as a notebook makes them: nothing is printed, progress
and warnings go to callbacks, errors name config fields, and a resumed run with a new learning rate and an
uninterrupted one agree where they must."""

import pytest
import torch

from handgrad import checkpoint, models, run
from handgrad.config import ConfigError
from handgrad.run import Events, RunConfig, Stopped
from handgrad.train import TrainConfig


def _small(steps=300, **kw):
    return models.preset("mlp", n_hidden=16), TrainConfig(steps=steps, chunk_steps=100, engine="eager", **kw)


def _events():
    heard = {"warn": [], "note": [], "start": [], "progress": []}
    events = Events(warn=heard["warn"].append, note=heard["note"].append,  # progress: the live state's step
                    on_start=lambda s: heard["start"].append(s) or (lambda p: heard["progress"].append(p.state.step)))
    return events, heard


def test_a_notebook_trains_a_run_directory_without_printing(tmp_path, capsys):
    events, heard = _events()
    r = run.new(*_small(checkpoint_every=100), RunConfig(out=str(tmp_path / "r"), samples=3), events)
    assert not (tmp_path / "r").exists()  # the data is read and checked before any directory is made
    outcome = run.go(r, events)
    assert capsys.readouterr() == ("", "")
    done = outcome.finished
    assert outcome.code == 0 and done.results["val"] < 3.3 and done.engine == "eager"
    assert heard["progress"] == [100, 200, 300]
    assert heard["start"][0].steps == 300 and str(heard["start"][0]).startswith("training mlp model, 1,257 parameters on 182,625 examples (eager engine")
    assert len(done.samples()) == 3 and list(done.lines())[-1].startswith(f"saved to {tmp_path / 'r'}/")
    ck = checkpoint.load(tmp_path / "r")
    assert ck.state.step == 300 and ck.inference is not None


def test_resume_with_a_new_learning_rate_keeps_the_rest_and_refuses_other_changes(tmp_path):
    out = tmp_path / "r"
    run.go(run.new(*_small(steps=200), RunConfig(out=str(out), samples=0)))
    with pytest.raises(ConfigError) as e:
        run.resume(out, {"n_hidden": 32})
    assert str(e.value).startswith("n_hidden cannot be changed when resuming")
    assert e.value.render(lambda f: "--" + f.replace("_", "-")).startswith("--n-hidden cannot be changed")
    with pytest.raises(ConfigError, match="steps 100 is below the checkpoint's step 200"):
        run.resume(out, {"steps": 100})
    r = run.resume(out, {"steps": 400, "lr": 0.05})
    assert r.ckpt.train_config.lr == 0.05 and r.ckpt.train_config.engine == "auto"  # engine: the command's
    assert [h["from_step"] for h in r.ckpt.lr_history] == [0, 200]
    assert run.go(r).finished.ckpt.state.step == 400


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "r"
    run.go(run.new(*_small(steps=100), RunConfig(out=str(out), samples=0)))
    r = run.resume(out, {"steps": 300})
    with torch.no_grad():
        r.ckpt.state.model.params()["5.weight"].fill_(1e38)  # the logits overflow at the next step
    with pytest.raises(Stopped) as e:
        run.go(r)
    assert e.value.code == 1 and e.value.resume is None
    assert str(e.value) == (f"training diverged at step 100: loss is NaN or infinite; the last good checkpoint "
                            f"(step 100) is kept in {out}/. Try a smaller lr or check the init.")
    assert "Try a smaller \x00lr\x00" in e.value.message  # the field, for the CLI to show as --lr
    assert checkpoint.load(out).state.step == 100


def test_a_second_run_into_a_directory_that_holds_one_is_refused_naming_the_fields(tmp_path):
    out = tmp_path / "r"
    run.go(run.new(*_small(steps=100), RunConfig(out=str(out), samples=0)))
    with pytest.raises(ConfigError) as e:
        run.go(run.new(*_small(steps=100), RunConfig(out=str(out))))
    assert str(e.value).startswith(f"out {out} already holds a run; continue it with resume {out}")
    assert run.go(run.new(*_small(steps=100), RunConfig(out=str(out), force=True, samples=0))).code == 0


def test_ranks_need_the_command_that_starts_them(tmp_path):
    r = run.new(*_small(steps=100), RunConfig(out=str(tmp_path / "r"), nproc=2))
    with pytest.raises(ConfigError, match="nproc starts `handgrad train` in 2 processes"):
        run.go(r)


def test_sample_and_evaluate_read_a_finished_run(tmp_path):
    out = tmp_path / "r"
    run.go(run.new(*_small(steps=100), RunConfig(out=str(out), samples=0)))
    names = run.sample(run.SampleConfig(checkpoint=str(out), n=4, seed=1))
    assert len(names) == 4 and names == run.sample(run.SampleConfig(checkpoint=str(out), n=4, seed=1))
    e = run.evaluate(run.EvalConfig(checkpoint=str(out)))
    assert set(e.losses) == {"train", "val", "test"} and str(e).startswith(f"checkpoint {out}: step 100")
    with pytest.raises(ConfigError, match="n 0: expected a positive number of samples"):
        run.SampleConfig(checkpoint=str(out), n=0)


def test_warnings_name_a_field_as_the_field_or_as_the_callers_name_for_it(tmp_path):
    heard = []
    r = run.new(*_small(steps=100, recompute_tile=8), RunConfig(out=str(tmp_path / "a"), samples=0))
    run.go(r, Events(warn=heard.append))
    r = run.new(*_small(steps=100, recompute_tile=8), RunConfig(out=str(tmp_path / "b"), samples=0))
    run.go(r, Events(warn=heard.append, field_name=lambda f: "--" + f.replace("_", "-")))
    assert heard == ["activation checkpointing (recompute_tile) needs the fast engine; ignored",
                     "activation checkpointing (--recompute-tile) needs the fast engine; ignored"]
