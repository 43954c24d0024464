"""The start-of-run report compares the dataset and settings with the guide's tables."""

from library.training.advice import RunFacts, report


def facts(**kw):
    base = dict(images=300, clips=0, network_dim=64, epochs=15, total_steps=4500, learning_rate=1.5e-4,
                preset="character")
    return RunFacts(**{**base, **kw})


def test_a_run_that_follows_the_guide_has_no_warnings():
    lines, warnings = report(facts())
    assert warnings == []
    assert "300 samples" in lines[0] and "guide for 300 samples: 48-64" in lines[1]


def test_too_few_samples_for_the_goal():
    _, warnings = report(facts(images=40, clips=10))
    assert any("minimum is 150 images or 30 clips" in w for w in warnings)
    _, warnings = report(facts(images=0, clips=120, preset="style", learning_rate=1e-4, network_dim=48))
    assert any("minimum is 200 clips" in w for w in warnings)


def test_rank_epochs_and_lr_against_the_tables():
    _, warnings = report(facts(images=150, network_dim=128, epochs=40, learning_rate=5e-4))
    text = " ".join(warnings)
    assert "rank 128 is high for 150 samples" in text
    assert "40 epochs is many" in text
    assert "outside the guide's 0.0001-0.0002 for character" in text
