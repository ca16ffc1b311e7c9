"""Where the Ray auth token comes from, and the clear errors when it is missing or wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.auth import TOKEN_ENV, TOKEN_PATH_ENV, AuthError, Token, explain_rejection, find_token


@pytest.fixture
def no_token_env(monkeypatch, tmp_path: Path) -> Path:
    """No token in the environment and an empty home, so only what a test sets is found."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_PATH_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_sources_in_priority_order(no_token_env: Path, monkeypatch) -> None:
    home = no_token_env
    assert find_token() is None
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("from-default\n")
    assert find_token().value == "from-default"
    (home / "path_token").write_text("from-path-env")
    monkeypatch.setenv(TOKEN_PATH_ENV, str(home / "path_token"))
    assert find_token().value == "from-path-env"
    (home / "cfg_token").write_text("from-config")
    assert find_token(str(home / "cfg_token")).value == "from-config"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    token = find_token(str(home / "cfg_token"))
    assert token.value == "from-env" and TOKEN_ENV in token.origin
    assert token.headers() == {"Authorization": "Bearer from-env"}


def test_named_token_file_that_is_missing_is_an_error(no_token_env: Path) -> None:
    with pytest.raises(AuthError, match=r"nope \(cluster.auth_token_file\) does not exist"):
        find_token(str(no_token_env / "nope"))


def test_rejection_message_names_the_source() -> None:
    assert "none was found" in explain_rejection("http://h:8265", "Unauthorized", None)
    msg = explain_rejection("http://h:8265", "Forbidden: Invalid", Token("tok", "test"))
    assert "rejected the auth token from test" in msg and TOKEN_ENV in msg


def test_right_token_works_and_wrong_or_missing_token_fails_clearly(cli, dashboard, tmp_path: Path) -> None:
    ok = cli("jobs", "list", "--address", dashboard)
    assert ok.returncode == 0, ok.stderr
    assert "job(s)" in ok.stdout

    wrong = cli("jobs", "list", "--address", dashboard, env={TOKEN_ENV: "wrong"})
    assert wrong.returncode != 0
    assert "rejected the auth token" in wrong.stderr and TOKEN_ENV in wrong.stderr
    assert "Traceback" not in wrong.stderr

    # No token anywhere: refused up front when this process runs with RAY_AUTH_MODE=token, else by the server.
    for mode in ("token", None):
        missing = cli(
            "jobs",
            "status",
            "anything",
            "--address",
            dashboard,
            env={TOKEN_ENV: None, TOKEN_PATH_ENV: None, "HOME": str(tmp_path), "RAY_AUTH_MODE": mode},
        )
        assert missing.returncode != 0
        assert "needs an auth token, but none was found" in missing.stderr, (mode, missing.stderr)
        assert "Traceback" not in missing.stderr


def test_submit_with_wrong_token_fails_before_uploading(cli, dashboard, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("cluster:\n  run_name: authtest\n")
    res = cli("submit", "data", str(cfg), "--address", dashboard, env={TOKEN_ENV: "wrong"})
    assert res.returncode == 2
    assert "rejected the auth token" in res.stderr and "Traceback" not in res.stderr


def test_joining_ray_without_or_with_a_wrong_token_is_one_line(cli, ray_cluster, tmp_path: Path) -> None:
    """Commands joining a cluster with `ray.init` (train, data, serve, eval) say what to do, no traceback."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"cluster:\n  run_name: authjoin\n  storage_path: {tmp_path}\n")
    no_token = {TOKEN_ENV: None, TOKEN_PATH_ENV: None, "HOME": str(tmp_path)}
    no_token["RAY_ADDRESS"] = ray_cluster.address
    missing = cli("data", "prepare", str(cfg), env={**no_token, "RAY_AUTH_MODE": None}, timeout=120)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "needs an auth token, but none was found" in missing.stderr and "Traceback" not in missing.stderr

    wrong = cli("data", "prepare", str(cfg), env={**no_token, TOKEN_ENV: "wrong"}, timeout=120)
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert "refused the auth token from environment variable RAY_AUTH_TOKEN" in wrong.stderr
    assert "Traceback" not in wrong.stderr
