"""The one exception type the CLI turns into a one-line message and exit code 2."""


import re

_INTERFACE = {"name": "api"}  # "cli" while a command of the command line runs (cli/app.py sets and resets it)

# Flags that are switches: in Python they are keyword arguments set to True (--no-X: X=False).
SWITCHES = frozenset({"overwrite", "zero_shot", "pretrained", "ablation", "protocol_audit", "verify", "tensorboard",
                      "download", "compile", "debug"})
# Flags whose Python argument has another name or shape.
API_NAMES = {"json": "as_json", "loss_param": "loss_params"}
_STOP = frozenset("and or with is to for the a an when not too only in on of from first here there once but may must "
                  "alone instead which that its as at it so then if be by".split())
_FLAG = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?:\s+([A-Z][A-Z_.=]*|[/.~0-9][^\s,;)]*|[a-z][\w./:-]*|'[^']*'))?")


def set_interface(name: str) -> None:
    """Which spelling errors use for options: "cli" (--overwrite) or "api" (overwrite=True), the default."""
    _INTERFACE["name"] = name


def _spell(match: re.Match) -> str:
    negated, name, value = match.group(1), match.group(2).replace("-", "_"), match.group(3)
    trail = ""
    if value:
        stripped = value.rstrip(":,.")
        value, trail = stripped or None, value[len(stripped):]
    return _spelled(negated, name, value) + trail


def _spelled(negated: str | None, name: str, value: str | None) -> str:
    if value is not None and (value in _STOP or name in SWITCHES):
        rest, value = f" {value}", None  # a word of the sentence, not the option's value
    else:
        rest = ""
    if name == "set":
        placeholder = value is not None and value[:1].isupper()
        return ("params={METHOD: {PARAM: VALUE}}" if placeholder else "params") + rest + (
            f" {value}" if value and not placeholder else "")
    name = API_NAMES.get(name, name)
    if name in SWITCHES or name == "as_json":
        return f"{name}={'False' if negated else 'True'}{rest}"
    if negated:
        return f"{name}=False{rest}"
    if value is None:
        return name + rest  # the argument's name: "pass backbone and dataset", "lr must be ..."
    return (f"{name}={value!r}" if value.islower() and value[0] not in "/.~'" else f"{name}={value}") + rest


def api_spelling(message: str) -> str:
    """A message's command-line options as the Python API's keyword arguments: --overwrite -> overwrite=True,
    --no-train-views -> train_views=False, --out DIR -> out=DIR, --backbone resnet50 -> backbone='resnet50', a
    bare --lr -> lr, --set ... -> params. An `ltcache COMMAND ...` to run keeps its flags, to the end of its
    clause."""
    clauses = re.split(r"(;\s*)", message)
    for index in range(0, len(clauses), 2):
        clause = clauses[index]
        command = re.search(r"\bltcache [a-z]", clause)
        head, tail = (clause[: command.start()], clause[command.start():]) if command else (clause, "")
        clauses[index] = _FLAG.sub(_spell, head) + tail
    return "".join(clauses)


class LtcacheError(Exception):
    """A user-facing error: bad input, a missing file, a name that is not registered.

    The message must say what is wrong and how to fix it, on one line. It is written with the command line's
    options (--overwrite); called from Python, it reads with the API's keyword arguments (overwrite=True).
    """

    def __str__(self) -> str:
        text = super().__str__()
        return text if _INTERFACE["name"] == "cli" else api_spelling(text)


def unknown_name(kind: str, name: str, known, *, instead: str | None = None) -> LtcacheError:
    """An error for a name missing from a registry: the closest names first (difflib), then the valid names (the
    first 30 of a longer registry, with their count), or `instead` of them where there are too many to list (timm's
    models: 'see timm.list_models()')."""
    import difflib

    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    if not close:  # a prefix or a different case: 'Fashion' -> fashion-mnist-lt
        close = [k for k in known if k.lower().startswith(str(name).lower()[:4])][:3] if str(name).strip() else []
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    if instead is not None:
        return LtcacheError(f"unknown {kind} {name!r}; {hint or ''}{instead}")
    listing = ", ".join(known) if len(known) <= 30 else ", ".join(known[:30]) + f", ... ({len(known)} in all)"
    return LtcacheError(f"unknown {kind} {name!r}; {hint}choose one of: {listing}")
