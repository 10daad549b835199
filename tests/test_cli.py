from experiments import cli


def test_list_names_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("gmm_engines", "fa_gaps", "vae_gaps"):
        assert name in out


def test_unknown_experiment_is_an_error(capsys):
    assert cli.main(["run", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
