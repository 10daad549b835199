import numpy as np
import pytest
import torch

from elbolab.models.data import load_array
from elbolab.models.validate import as_data, integer, positive


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.array([[1.0, np.nan]]), "data: contains NaN"),
        (np.array([[1.0, np.inf]]), "data: contains inf"),
        (np.zeros((0, 2)), "data: expected at least 1 row"),
        (np.zeros((2, 2, 2)), "data: expected 2 dimensions"),
        (None, "data: got None"),
    ],
)
def test_bad_data_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        as_data(x)


def test_strings_rejected():
    with pytest.raises(TypeError, match="data: expected numeric"):
        as_data(np.array([["a", "b"]]))


def test_dtype_and_device_follow_input():
    t = torch.ones(3, 2, dtype=torch.float64)
    assert as_data(t).dtype == torch.float64
    assert as_data(np.ones((3, 2))).dtype == torch.float64
    assert as_data(np.ones((3, 2), dtype=np.float32)).dtype == torch.float32
    assert as_data(torch.ones(3, 2, dtype=torch.int64)).is_floating_point()


def test_scalar_checks():
    with pytest.raises(ValueError, match="prior_var: must be a positive"):
        positive(0.0, "prior_var")
    with pytest.raises(ValueError, match="prior_var: is NaN"):
        positive(float("nan"), "prior_var")
    with pytest.raises(ValueError, match="K: must be >= 1"):
        integer(0, "K")
    with pytest.raises(TypeError, match="K: must be an integer"):
        integer(2.5, "K")


def test_load_array_csv_npy_npz(tmp_path):
    a = np.arange(6, dtype=float).reshape(3, 2)
    (tmp_path / "a.csv").write_text("u,v\n0,1\n2,3\n4,5\n")
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "a.npz", a=a)
    for name in ("a.csv", "a.npy", "a.npz"):
        np.testing.assert_array_equal(load_array(tmp_path / name), a)
    (tmp_path / "bad.csv").write_text("u,v\n0,x\n")
    with pytest.raises(ValueError, match="^data: .*line 2, column 'v': 'x' is not a number"):
        load_array(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="data: no such file"):
        load_array(tmp_path / "missing.csv")
    (tmp_path / "a.json").write_text("[[0, 1]]")
    with pytest.raises(ValueError, match="^data: unsupported file type '.json'"):
        load_array(tmp_path / "a.json")


def test_engine_and_tool_settings_name_the_field():
    import torch as _t

    from elbolab.inference import mcmc, svi
    from elbolab.inference.impute import rmse

    with pytest.raises(ValueError, match="^val_particles"):
        svi.Settings(val_particles=0)
    with pytest.raises(ValueError, match="^rhat_max"):
        mcmc.Settings(rhat_max=0.9)
    with pytest.raises(ValueError, match="^truth|^mask|^imputed"):
        rmse(_t.zeros(3, 2), _t.zeros(2, 2), _t.ones(3, 2, dtype=_t.bool))


def test_gmm_script_rejects_empty_simulation(tmp_path):
    from elbolab.experiments import gmm_engines

    with pytest.raises(SystemExit, match="n"):
        gmm_engines.main(["--n", "0", "--out", str(tmp_path), "--quick"])


def test_csv_without_header_keeps_its_first_row(tmp_path):
    """A numeric first row is data (it used to be dropped silently as a header)."""
    (tmp_path / "plain.csv").write_text("1,2\n3,4\n5,6\n")
    np.testing.assert_array_equal(load_array(tmp_path / "plain.csv"),
                                  [[1, 2], [3, 4], [5, 6]])
    (tmp_path / "named.csv").write_text("x1, x2\n1,2\n3,4\n")
    np.testing.assert_array_equal(load_array(tmp_path / "named.csv"), [[1, 2], [3, 4]])
    (tmp_path / "gaps.csv").write_text("a,b\n1,\nNA,4\n")
    got = load_array(tmp_path / "gaps.csv")
    assert np.isnan(got[0, 1]) and np.isnan(got[1, 0]) and got[1, 1] == 4
    (tmp_path / "spaces.txt").write_text("1 2.5\n3\t4\n")
    np.testing.assert_array_equal(load_array(tmp_path / "spaces.txt"), [[1, 2.5], [3, 4]])


def test_npz_and_npy_rules(tmp_path):
    a = np.arange(6.0).reshape(3, 2)
    np.savez(tmp_path / "xy.npz", x=a, y=np.arange(3))
    np.testing.assert_array_equal(load_array(tmp_path / "xy.npz"), a)  # 'x' named: picked
    np.savez(tmp_path / "imgs.npz", images=a, labels=np.arange(3))
    np.testing.assert_array_equal(load_array(tmp_path / "imgs.npz", exclude=("labels",)), a)
    np.testing.assert_array_equal(load_array(tmp_path / "imgs.npz", key="labels"), np.arange(3))
    np.save(tmp_path / "b.npy", np.array([[True, False]]))
    got = load_array(tmp_path / "b.npy")
    assert got.dtype == np.float64 and got.tolist() == [[1.0, 0.0]]
    np.save(tmp_path / "f32.npy", a.astype(np.float32))
    assert load_array(tmp_path / "f32.npy").dtype == np.float32


def test_memory_guard_names_the_setting(monkeypatch):
    from elbolab.models.validate import TooLarge, check_size, memory_budget

    budget, source = memory_budget()
    assert budget > 0 and source
    assert check_size(10, "K", "a tiny thing") == 80
    with pytest.raises(TooLarge, match="^K: EM with K=9 needs about"):
        check_size(budget, "K", "EM with K=9")
    monkeypatch.setenv("ELBOLAB_MEMORY_BUDGET", "1000")
    assert memory_budget() == (1000, "ELBOLAB_MEMORY_BUDGET")
    with pytest.raises(TooLarge, match="^num_particles:"):
        check_size(126, "num_particles", "a step")


def test_seed_bounds_everywhere():
    from elbolab.models.gmm.model import BayesianGMM

    with pytest.raises(ValueError, match="^seed:"):
        integer(2**63, "seed", minimum=0)
    assert integer(2**63 - 1, "seed", minimum=0) == 2**63 - 1
    x, _ = BayesianGMM().simulate(3, seed=2**63 - 1)  # the largest seed works
    assert x.shape == (3, 1)
