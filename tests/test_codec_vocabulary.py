"""Every codec module speaks the same vocabulary (README, "How to add a channel"): canonical imported as
`c`, the channel's wire format as private Structs under a `# --- wire format` heading, the decoding side
named `_Decoder` and the encoding side `_Encoder`. (Public Structs a codec class names, its declared
settings, are the codec's interface, not wire format.) Read from the sources, so a new codec that drifts fails
here instead of in review."""

from __future__ import annotations

import ast
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

import babelhub.codecs
from babelhub.codecs import Codec, available, load

CODECS_FOLDER = Path(babelhub.codecs.__file__).parent
WIRE_FORMAT_HEADING = re.compile(r"^# -+ wire format", re.MULTILINE)

#: Channels whose encoding needs no class of its own: Messenger encodes in its codec class (the Instagram
#: codec overrides part of it), webchat hands the canonical JSON to the browser as it is.
ENCODES_IN_THE_CODEC_CLASS = frozenset({"messenger", "instagram", "webchat"})
#: Webchat decodes one bounded frame into one message in its `decode`: nothing to share between events.
DECODES_IN_THE_CODEC_CLASS = frozenset({"webchat"})


def _channel_module(channel: str) -> ModuleType:
    return sys.modules[type(load(channel)).__module__]


def _canonical_imports(tree: ast.Module) -> list[str]:
    """How a module imports `babelhub.canonical`, one entry per import statement."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "babelhub.canonical":
            found.append("from babelhub.canonical import …")
        elif isinstance(node, ast.ImportFrom) and node.module == "babelhub":
            found.extend(f"from babelhub import {a.name} as {a.asname}" for a in node.names if a.name == "canonical")
        elif isinstance(node, ast.Import):
            found.extend(f"import {a.name}" for a in node.names if a.name == "babelhub.canonical")
    return found


@pytest.mark.parametrize("path", sorted(CODECS_FOLDER.glob("*.py")), ids=lambda path: path.name)
def test_canonical_is_imported_one_way(path: Path) -> None:
    imports = _canonical_imports(ast.parse(path.read_text()))
    assert set(imports) <= {"from babelhub import canonical as c"}, imports


def _declared_by_codecs(module: ModuleType) -> set[type]:
    """The types the module's codec classes name in their class attributes (the settings they declare),
    with the classes those derive from."""
    codecs = [value for value in vars(module).values() if isinstance(value, type) and issubclass(value, Codec)]
    named = (value for codec in codecs for cls in codec.__mro__ for value in vars(cls).values())
    return {base for value in named if isinstance(value, type) for base in value.__mro__}


@pytest.mark.parametrize("channel", available())
def test_wire_structs_are_private_under_their_heading(channel: str) -> None:
    module = _channel_module(channel)
    assert WIRE_FORMAT_HEADING.search(inspect.getsource(module)), f"{module.__name__} has no wire format heading"
    public_structs = [
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == module.__name__
        and not name.startswith("_")
        and value not in _declared_by_codecs(module)
    ]
    assert public_structs == [], f"{module.__name__}: wire Structs are private (`_Name`)"


@pytest.mark.parametrize("channel", available())
def test_the_decoding_and_encoding_sides_have_the_same_names(channel: str) -> None:
    module = _channel_module(channel)
    if channel not in DECODES_IN_THE_CODEC_CLASS:
        assert isinstance(getattr(module, "_Decoder", None), type), f"{module.__name__} has no _Decoder"
    if channel not in ENCODES_IN_THE_CODEC_CLASS:
        assert isinstance(getattr(module, "_Encoder", None), type), f"{module.__name__} has no _Encoder"
