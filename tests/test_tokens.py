"""Template tokens (contract.md 6, the seed's token table)."""

from __future__ import annotations

import shlex

import pytest

from cio_worker.errors import CioError, FrameSpecError, TokenError
from cio_worker.job.frames import FrameSet
from cio_worker.job.tokens import TOKENS, Scope, TemplateError, chunk_values, render, tokens_in

# The seed's table (seeds/000_*, end): token -> (example value, scope).
SEED_TABLE = {
    "sequencelength": ("10", "Job"),
    "sequence": ("1-10", "Job"),
    "sequencemin": ("1", "Job"),
    "sequencemax": ("10", "Job"),
    "cores": ("2", "Job"),
    "flavor": ("standard", "Job"),
    "instance": ("2 core, 7.50GB Mem", "Job"),
    "preemptible": ("preemptible", "Job"),
    "retries": ("3", "Job"),
    "job": ("conductor_job_item_name", "Job"),
    "sources": ("project://scene/image1 project://scene/image2", "Job"),
    "scout": ("3-8x5", "Job"),
    "chunksize": ("2", "Job"),
    "chunkcount": ("5", "Job"),
    "scoutcount": ("2", "Job"),
    "render_package": ('"/path/to/project/shot.render"', "Global"),
    "project": ("harry_potter", "Job"),
    "chunks": ("'9:10' '9:10'", "Task"),
    "chunklength": ("2", "Task"),
    "chunkstart": ("9", "Task"),
    "chunkend": ("10", "Task"),
    "directories": ('"/path/to/renders/layerA" "/path/to/renders/layerB"', "Job"),
    "pdir": ("/path/to/project", "Global"),
    "temp_dir": ('"/path/to/temp/directory"', "Global"),
    "tiles": ("9", "Job"),
    "tile_number": ("1", "Tile"),
}
SEED_VALUES = {name: example for name, (example, _) in SEED_TABLE.items()}

TASK_TEMPLATE = (
    "<temp_dir>/ciocnode <render_package> -image <sources> -image_frames_list <chunks> "
    "-tile_rendering <tiles> <tile_number> -license_server conductor_ilise:40500"
)


def test_token_table_is_the_seeds() -> None:
    assert dict(TOKENS) == {name: Scope[scope.upper()] for name, (_, scope) in SEED_TABLE.items()}


@pytest.mark.parametrize("name", sorted(SEED_TABLE))
def test_each_token_renders_its_value_at_its_scope_and_wider_templates(name: str) -> None:
    example, scope_name = SEED_TABLE[name]
    scope = Scope[scope_name.upper()]
    for template_scope in Scope:
        if template_scope >= scope:
            assert render(f"[<{name}>]", SEED_VALUES, scope=template_scope) == f"[{example}]"
        else:
            with pytest.raises(TemplateError) as info:
                render(f"[<{name}>]", SEED_VALUES, scope=template_scope, where="job template")
            assert info.value.token == name
            assert info.value.column == 2
            assert f"<{name}>" in str(info.value)
            assert "job template, column 2" in str(info.value)
            assert f"{scope.label}-scope" in str(info.value)


def test_scope_error_for_chunks_in_a_job_template() -> None:
    with pytest.raises(TokenError, match=r"job title, column 8: <chunks> is a Task-scope token") as info:
        render("Render <chunks>", SEED_VALUES, where="job title", scope=Scope.JOB)
    assert info.value.code == "bad_template"


def test_seed_example_task_template_resolves() -> None:
    values = dict(SEED_VALUES, temp_dir="/tmp/conductor")
    command = render(TASK_TEMPLATE, values)
    assert command == (
        '/tmp/conductor/ciocnode "/path/to/project/shot.render" -image project://scene/image1 '
        "project://scene/image2 -image_frames_list '9:10' '9:10' -tile_rendering 9 1 "
        "-license_server conductor_ilise:40500"
    )


# -- a job of two images with different ranges --------------------------------------------------

IMAGES = [
    ("project://scene/image1", FrameSet.parse("1-10")),
    ("project://scene/image2", FrameSet.parse("5-13x2")),
]


def _job_frames() -> FrameSet:
    return IMAGES[0][1] | IMAGES[1][1]


def test_chunk_values_per_chunk_drop_images_with_nothing_to_render() -> None:
    chunks = _job_frames().chunks(2)
    assert [c.canonical() for c in chunks] == ["1-2", "3-4", "5-6", "7-8", "9-10", "11-13x2"]
    values = [chunk_values(c, IMAGES) for c in chunks]
    assert values[0] == {
        "sources": "project://scene/image1",
        "chunks": "'1:2'",
        "chunklength": "2",
        "chunkstart": "1",
        "chunkend": "2",
    }
    assert values[2]["sources"] == "project://scene/image1 project://scene/image2"
    assert values[2]["chunks"] == "'5:6' '5'"
    assert values[4]["chunks"] == "'9:10' '9'"
    assert values[5] == {
        "sources": "project://scene/image2",
        "chunks": "'11:13%2'",
        "chunklength": "2",
        "chunkstart": "11",
        "chunkend": "13",
    }


def test_chunk_values_keep_image_order_and_cnode_steps() -> None:
    images = [("project://scene/b", FrameSet.parse("9-13x2")), ("project://scene/a", FrameSet.parse("1-20"))]
    values = chunk_values(FrameSet.parse("9-13"), images)
    assert values["sources"] == "project://scene/b project://scene/a"
    assert values["chunks"] == "'9:13%2' '9:13'"


def test_chunk_values_negative_frames() -> None:
    values = chunk_values(FrameSet.parse("-5--1"), [("project://scene/image1", FrameSet.parse("-10-10"))])
    assert values["chunks"] == "'-5:-1'"
    assert (values["chunkstart"], values["chunkend"], values["chunklength"]) == ("-5", "-1", "5")


def test_chunk_values_errors() -> None:
    with pytest.raises(FrameSpecError, match="no image renders any frame of chunk 20-21"):
        chunk_values(FrameSet.parse("20-21"), IMAGES)
    with pytest.raises(FrameSpecError, match="no frames"):
        chunk_values(FrameSet(), IMAGES)


def test_two_image_job_commands_split_into_cnode_arguments() -> None:
    job = {
        "temp_dir": "/tmp/conductor",
        "render_package": '"/proj/my shots/shot_A.MyJob.cio.project"',
        "tiles": "4",
    }
    commands = []
    for chunk in _job_frames().chunks(4):
        for tile in range(1, 5):
            values = {**job, **chunk_values(chunk, IMAGES), "tile_number": str(tile)}
            commands.append(render(TASK_TEMPLATE, values))
    assert len(commands) == 12
    argv = shlex.split(commands[5])  # chunk 5-8, tile 2
    assert argv == [
        "/tmp/conductor/ciocnode",
        "/proj/my shots/shot_A.MyJob.cio.project",
        "-image",
        "project://scene/image1",
        "project://scene/image2",
        "-image_frames_list",
        "5:8",
        "5:7%2",
        "-tile_rendering",
        "4",
        "2",
        "-license_server",
        "conductor_ilise:40500",
    ]
    first = shlex.split(commands[0])
    assert first[first.index("-image") + 1 : first.index("-image_frames_list")] == ["project://scene/image1"]
    assert first[first.index("-image_frames_list") + 1] == "1:4"
    last = shlex.split(commands[-1])
    # chunk 9-11,13: contract.md 6's example
    assert last[last.index("-image") + 1 : last.index("-image_frames_list")] == [
        "project://scene/image1",
        "project://scene/image2",
    ]
    assert last[last.index("-image_frames_list") + 1 : last.index("-tile_rendering")] == ["9:10", "9:13%2"]


# -- syntax ------------------------------------------------------------------------------------


def test_double_angle_is_a_literal_angle() -> None:
    assert render("a <<b", {}) == "a <b"
    assert render("<<<chunks>", {"chunks": "'1:2'"}) == "<'1:2'"
    assert render("<<chunks>", {}) == "<chunks>"
    assert render("cnode x > out.log 2>&1", {}) == "cnode x > out.log 2>&1"
    assert render("", {}) == ""


def test_custom_tokens_given_by_the_caller_render() -> None:
    assert render("<my_thing>-<tile_number>", {"my_thing": "x", "tile_number": "3"}) == "x-3"


def test_unknown_token_names_token_and_column() -> None:
    with pytest.raises(TemplateError) as info:
        render("cnode -image_frames_list <chunk>", SEED_VALUES, where="task template")
    err = info.value
    assert isinstance(err, TokenError) and isinstance(err, CioError)
    assert (err.token, err.column, err.line, err.where) == ("chunk", 26, 1, "task template")
    assert "unknown token <chunk>" in str(err)
    assert "did you mean <chunks>" in str(err)
    assert str(err).startswith("task template, column 26:")


def test_known_token_without_a_value_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"column 3: <scout> has no value here"):
        render("x <scout>", {})


def test_error_location_on_a_later_line() -> None:
    with pytest.raises(TemplateError, match=r"script, line 2, column 6: unknown token <nope>") as info:
        render("echo\necho <nope>", {}, where="script")
    assert (info.value.line, info.value.column) == (2, 6)


@pytest.mark.parametrize(
    ("template", "column", "says"),
    [
        ("cnode < in.txt", 7, "starts no token; write '<<'"),
        ("a <b", 3, "starts no token"),
        ("x <5>", 3, "<5> is not a token"),
        ("<a>", 1, "too short"),
        ("<chunks >", 1, "not a token"),
        ("<pad chunkstart>", 1, "needs a digit count"),
        ("<upper job 3>", 1, "takes no number"),
        ("<pad chunkstart 0>", 1, "digit count must be from 1"),
        ("<pad chunkstart 65>", 1, "digit count must be from 1"),
        ("ok <posix C:/x>", 4, "not a posix modifier"),
        ("<nope <chunks>", 1, "starts no token"),
        ("<chunks", 1, "starts no token"),
        ("<chunk-s>", 1, "not a token"),
    ],
)
def test_malformed_templates(template: str, column: int, says: str) -> None:
    with pytest.raises(TemplateError, match=says) as info:
        render(template, SEED_VALUES)
    assert info.value.column == column
    with pytest.raises(TemplateError):
        tokens_in(template)


def test_non_text_template() -> None:
    with pytest.raises(TokenError, match="must be text"):
        render(None, {})  # type: ignore[arg-type]


def test_tokens_in_lists_names_in_first_use_order() -> None:
    assert tokens_in(TASK_TEMPLATE) == ["temp_dir", "render_package", "sources", "chunks", "tiles", "tile_number"]
    assert tokens_in("<pad chunkstart 4> <upper job> <<x> <job> <chunkstart>") == ["chunkstart", "job"]
    assert tokens_in("nothing < < here".replace("< <", "<< <<")) == []


# -- modifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "width", "expected"),
    [("7", 4, "0007"), ("-5", 4, "-0005"), ("12345", 4, "12345"), ("0", 3, "000"), ("-12", 1, "-12"), ("+3", 2, "03")],
)
def test_pad(value: str, width: int, expected: str) -> None:
    assert render(f"f<pad chunkstart {width}>", {"chunkstart": value}) == f"f{expected}"


def test_pad_of_a_non_number_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"column 3: <pad job 4>: value 'shot' of <job> is not a whole number"):
        render("x <pad job 4>", {"job": "shot"})


def test_posix() -> None:
    assert render("<posix pdir>", {"pdir": "C:\\proj\\shot A"}) == "/proj/shot A"
    assert render("<posix pdir>", {"pdir": "/already/posix"}) == "/already/posix"
    assert render("<posix render_package>", {"render_package": '"C:\\proj\\shot.project"'}) == '"/proj/shot.project"'
    directories = '"D:\\renders\\layerA" "D:/renders/layerB"'
    assert render("<posix directories>", {"directories": directories}) == '"/renders/layerA" "/renders/layerB"'


def test_upper_and_lower() -> None:
    values = {"flavor": "Standard", "preemptible": "non-preemptible"}
    assert render("<upper flavor>/<lower flavor>/<upper preemptible>", values) == "STANDARD/standard/NON-PREEMPTIBLE"


def test_basename_and_basename_without_extension() -> None:
    values = {"render_package": '"/path/to/project/shot.render"', "pdir": "C:\\path\\to\\project\\"}
    assert render("<basename render_package>", values) == '"shot.render"'
    assert render("<basename_x render_package>", values) == '"shot"'
    assert render("<basename pdir> <basename_x pdir>", values) == "project project"
    assert render("<basename_x job>", {"job": "/a/archive.tar.gz"}) == "archive.tar"


def test_modifier_arguments_obey_scope_and_must_exist() -> None:
    with pytest.raises(TemplateError, match="<chunkstart> is a Task-scope token") as info:
        render("<pad chunkstart 4>", {"chunkstart": "1"}, scope=Scope.JOB)
    assert info.value.token == "chunkstart"
    with pytest.raises(TemplateError, match="unknown token <nothing>"):
        render("<upper nothing>", {})


def test_modifier_words_are_ordinary_tokens_alone() -> None:
    assert render("<upper>", {"upper": "u"}) == "u"
    with pytest.raises(TemplateError, match="unknown token <posix>"):
        render("<posix>", {})
