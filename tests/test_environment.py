"""Job environment entries merged onto the node's environment (contract.md 7)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cio_worker.job.environment import EnvEntry, expand_references, is_secret_name, masked, merge_environment
from cio_worker.errors import CioError, EnvironmentSpecError

NODE = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/render", "LANG": "C.UTF-8"}
CLARISSE_PACKAGE = [
    EnvEntry("PATH", "/opt/isotropix/clarisse/5.0/bin", "append"),
    EnvEntry("ILISE_SERVER", "conductor_ilise:40500", "exclusive"),
]


def test_exclusive_replaces() -> None:
    env = merge_environment({"FOO": "old"}, [EnvEntry("FOO", "new", "exclusive")])
    assert env["FOO"] == "new"


def test_append_joins_with_colon_on_linux_and_semicolon_on_windows() -> None:
    entries = [EnvEntry("P", "b", "append")]
    assert merge_environment({"P": "a"}, entries)["P"] == "a:b"
    assert merge_environment({"P": "a"}, entries, platform="linux")["P"] == "a:b"
    assert merge_environment({"P": "a"}, entries, platform="windows")["P"] == "a;b"
    assert merge_environment({"P": "a"}, entries, platform="win32")["P"] == "a;b"


def test_prepend() -> None:
    env = merge_environment({"P": "a"}, [EnvEntry("P", "b", "prepend"), EnvEntry("P", "c", "prepend")])
    assert env["P"] == "c:b:a"


@pytest.mark.parametrize("policy", ["append", "prepend"])
def test_empty_value_so_far_counts_as_unset(policy: str) -> None:
    assert merge_environment({"P": ""}, [EnvEntry("P", "x", policy)])["P"] == "x"  # not ':x' or 'x:'
    assert merge_environment({}, [EnvEntry("P", "x", policy)])["P"] == "x"


def test_appending_an_empty_value_keeps_the_value_so_far() -> None:
    assert merge_environment({"P": "a"}, [EnvEntry("P", "", "append")])["P"] == "a"


def test_path_append_keeps_the_nodes_own_path() -> None:
    env = merge_environment(NODE, CLARISSE_PACKAGE)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/opt/isotropix/clarisse/5.0/bin"
    assert env["ILISE_SERVER"] == "conductor_ilise:40500"
    assert env["HOME"] == "/home/render"


def test_base_is_not_modified() -> None:
    base = dict(NODE)
    merge_environment(base, CLARISSE_PACKAGE)
    assert base == NODE


def test_package_entries_first_then_the_users_in_order() -> None:
    user = [
        EnvEntry("PATH", "/my/scripts", "append"),
        EnvEntry("ILISE_SERVER", "studio_lic:40500", "exclusive"),
        EnvEntry("MY_VAR", "one", "exclusive"),
        EnvEntry("MY_VAR", "two", "append"),
    ]
    env = merge_environment(NODE, [*CLARISSE_PACKAGE, *user])
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/opt/isotropix/clarisse/5.0/bin:/my/scripts"
    assert env["ILISE_SERVER"] == "studio_lic:40500"
    assert env["MY_VAR"] == "one:two"
    # The other order gives the other answer: order matters.
    env = merge_environment(NODE, [*user, *CLARISSE_PACKAGE])
    assert env["ILISE_SERVER"] == "conductor_ilise:40500"


def test_references_expand_against_the_environment_so_far() -> None:
    entries = [
        EnvEntry("TOOLS", "${HOME}/tools", "exclusive"),
        EnvEntry("PYTHONPATH", "$TOOLS/python", "append"),
        EnvEntry("PYTHONPATH", "/extra", "append"),
        EnvEntry("PATH", "$TOOLS/bin", "prepend"),
        EnvEntry("COST", "$$5 and ${UNSET_VAR}.", "exclusive"),
    ]
    env = merge_environment({"PATH": "/bin", "HOME": "/home/r", "PYTHONPATH": "/site"}, entries)
    assert env["TOOLS"] == "/home/r/tools"
    assert env["PYTHONPATH"] == "/site:/home/r/tools/python:/extra"
    assert env["PATH"] == "/home/r/tools/bin:/bin"
    assert env["COST"] == "$5 and ."


def test_expansion_can_be_turned_off() -> None:
    env = merge_environment({"HOME": "/h"}, [EnvEntry("X", "$HOME", "exclusive")], expand=False)
    assert env["X"] == "$HOME"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$A", "1"),
        ("${A}", "1"),
        ("${A}x", "1x"),
        ("$Ax", ""),
        ("a$", "a$"),
        ("$1", "$1"),
        ("$$A", "$A"),
        ("$A:$B_2", "1:two"),
        ("no refs", "no refs"),
    ],
)
def test_expand_references(value: str, expected: str) -> None:
    assert expand_references(value, {"A": "1", "B_2": "two"}) == expected


@pytest.mark.parametrize("value", ["${A", "${1A}", "${}", "x ${A B}"])
def test_malformed_references_are_errors(value: str) -> None:
    with pytest.raises(EnvironmentSpecError, match="variable reference at character .* is malformed") as info:
        expand_references(value, {"A": "1"})
    assert value not in str(info.value)  # the value may be a secret: never quoted
    assert isinstance(info.value, CioError)
    assert info.value.code == "bad_environment"


def test_unknown_merge_policy_is_an_error() -> None:
    with pytest.raises(EnvironmentSpecError, match="'replace' is not one of exclusive, append, prepend"):
        EnvEntry("PATH", "/x", "replace")


def test_entry_round_trip() -> None:
    entry = EnvEntry("PATH", "/x", "append")
    assert EnvEntry(**entry.to_dict()) == entry
    assert EnvEntry("A", "b").merge_policy == "exclusive"


def test_masked_hides_secret_values_only() -> None:
    env = {
        "AWS_SECRET_ACCESS_KEY": "abc",
        "GITHUB_TOKEN": "t",
        "DB_PASSWORD": "p",
        "my_api_key": "k",
        "EMPTY_TOKEN": "",
        "PATH": "/bin",
        "STUDIO_LICENSE": "lic",
    }
    out = masked(env, extra_secret_names=["studio_license"])
    assert out == {
        "AWS_SECRET_ACCESS_KEY": "****",
        "GITHUB_TOKEN": "****",
        "DB_PASSWORD": "****",
        "my_api_key": "****",
        "EMPTY_TOKEN": "",
        "PATH": "/bin",
        "STUDIO_LICENSE": "****",
    }
    assert env["GITHUB_TOKEN"] == "t"
    assert is_secret_name("google_application_credentials")
    assert not is_secret_name("ILISE_SERVER")


def test_merged_environment_reaches_a_real_process() -> None:
    env = merge_environment(
        {"PATH": os.environ["PATH"]},
        [*CLARISSE_PACKAGE, EnvEntry("GREETING", "hello ${ILISE_SERVER}", "exclusive")],
    )
    script = "import os, shutil; print(os.environ['GREETING']); print(shutil.which('sh') is not None)"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["hello", "conductor_ilise:40500", "True"]
