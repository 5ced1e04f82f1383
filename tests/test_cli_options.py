"""`document_command`: every document command takes INPUTS, then its own options, then the shared ones, each
shared option spelled the same everywhere."""

import typer.main

from dsvl2.app import SHARED_OPTIONS, app

OWN_OPTIONS = {
    "ocr": ["prompt"],
    "table": ["prompt"],
    "chart": ["prompt"],
    "ground": ["query", "template", "prompt", "annotate"],
    "ask": ["prompt", "prompts", "per", "window"],
}


def test_document_commands_have_inputs_own_then_shared_options():
    commands = typer.main.get_command(app).commands
    inputs, *shared = SHARED_OPTIONS
    spelled = set()
    for name, own in OWN_OPTIONS.items():
        params = commands[name].params
        assert [p.name for p in params] == [inputs, *own, *shared], name
        spelled.add(tuple((p.name, tuple(p.opts), p.default, p.help) for p in params if p.name in SHARED_OPTIONS))
    assert len(spelled) == 1
