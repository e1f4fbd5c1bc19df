"""Settings declared once: a dataclass field made with :func:`setting` carries its
help text, its check and how it appears on a command line; :func:`add_flags`
generates the argparse flags of such a dataclass and :func:`flag_checks` the
checks of their values; :func:`parse_settings` does all three for a script whose
options are one dataclass (the benchmarks).

:class:`rflow_tf.models.FlowConfig`, :class:`rflow_tf.training.TrainingOptions`
and :class:`rflow_tf.toy.ToyOptions` declare their settings this way, so a
setting is written in one place: name and type (the field), default, help,
check, flag group. Adding a training option is one field plus the code that
reads it; ``train/main.py`` and ``train/toy.py`` pick up the flag, its help and
its check.

Why a small generator of our own and not a library (``tyro``,
``simple-parsing``, ``ml_collections`` config flags): the command lines predate
this module and must keep their exact flag names, help texts, defaults and
error messages. They do things those libraries spell differently: the
architecture flags of ``train/main.py`` default to ``None``, "the preset's
value", not to the dataclass default; booleans are ``--flag[=BOOL]``
(``train/main.py``) or plain switches (``train/toy.py``); flags of two
dataclasses share argument groups; the checks' messages say
``--lr must be a finite number > 0, got inf``. Reproducing that through a
library's extension points would take as much code as this module (about 150
lines), and would add a dependency to a package whose only dependencies are
TensorFlow's stack.

Example:
```python
import argparse
from rflow_tf.settings import add_flags, flag_checks
from rflow_tf.training import TrainingOptions

parser = argparse.ArgumentParser()
add_flags(parser, [TrainingOptions])  # --dataset ... --lr ..., with their help
args = parser.parse_args(["--lr=0"])
bad = [n for n, ok, _ in flag_checks(TrainingOptions) if getattr(args, n) is not None
       and not ok(getattr(args, n))]
assert bad == ["lr"]   # its check: "a finite number > 0"
```
"""

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Optional, Tuple

#: The metadata key of a field's :class:`Setting`.
KEY = "rflow_tf.setting"


@dataclasses.dataclass(frozen=True)
class Check:
    """A constraint on a setting's value: ``ok(value)`` is true for a valid value;
    ``requirement`` says what the value must be, as in "--lr must be <requirement>".

    Example: ``Check(lambda v: v >= 1, ">= 1").ok(0)  # False``.
    """

    ok: Callable[[Any], bool]
    requirement: str


def at_least(low, note=""):
    """Check ``value >= low`` ("'>= low' + note").

    Example: ``at_least(0, " (0 = no crop)").requirement  # ">= 0 (0 = no crop)"``.
    """
    return Check(lambda v: v >= low, f">= {low}{note}")


def finite_above(low):
    """Check a finite ``value > low`` ("a finite number > low").

    Example: ``finite_above(0).ok(float("inf"))  # False``.
    """
    return Check(lambda v: math.isfinite(float(v)) and v > low, f"a finite number > {low}")


def finite_at_least(low, note=""):
    """Check a finite ``value >= low`` ("a finite number >= low" + note).

    Example: ``finite_at_least(0, " (0 disables)").ok(0)  # True``.
    """
    return Check(lambda v: math.isfinite(float(v)) and v >= low, f"a finite number >= {low}{note}")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field declares beyond its name, type and default (see :func:`setting`).

    Example: ``field_setting(dataclasses.fields(TrainingOptions)[0]).help``.
    """

    help: str
    check: Optional[Check] = None
    flag: Any = True  # True, False (not on the command line) or "hidden" (no help)
    group: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple] = None
    metavar: Any = None
    nargs: Any = None


def setting(
    default,
    help,
    check=None,
    flag=True,
    group=None,
    parse=None,
    choices=None,
    metavar=None,
    nargs=None,
):
    """A dataclass field with its default and its declaration: ``help`` (the
    flag's help text; None: no help line), ``check`` (a :class:`Check` of flag
    values), ``flag`` (True: a command-line flag; False: none; "hidden": a flag
    left out of ``--help``), ``group`` (the ``--help`` section), ``parse`` (the
    argparse ``type``; default: from the field's type), ``choices``,
    ``metavar`` and ``nargs`` (default: "+" for a ``List[X]`` field, none
    otherwise). A list ``default`` becomes a default factory (each instance
    gets its own copy).

    Example:
    ```python
    @dataclasses.dataclass
    class Options:
        lr: float = setting(1e-3, help="Adam learning rate.", check=finite_above(0))
    ```
    """
    info = Setting(
        help, check, flag, group, parse, None if choices is None else tuple(choices), metavar, nargs
    )
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={KEY: info})
    return dataclasses.field(default=default, metadata={KEY: info})


def field_setting(field):
    """The :class:`Setting` of a dataclass ``field`` (None if it was not made by :func:`setting`).

    Example: ``[f.name for f in dataclasses.fields(FlowConfig) if field_setting(f).flag]``.
    """
    return field.metadata.get(KEY)


def flag_fields(cls):
    """The fields of dataclass ``cls`` that are command-line flags, in declaration order.

    Example: ``[f.name for f in flag_fields(TrainingOptions)]``.
    """
    return tuple(
        f for f in dataclasses.fields(cls) if field_setting(f) is not None and field_setting(f).flag
    )


def flag_names(cls):
    """The names of :func:`flag_fields` ``(cls)``.

    Example: ``"n_blocks" in flag_names(FlowConfig)  # True``.
    """
    return tuple(f.name for f in flag_fields(cls))


def flag_checks(cls):
    """``(name, ok, requirement)`` of every flag of ``cls`` with a :class:`Check`.

    Example: ``dict((n, r) for n, _, r in flag_checks(TrainingOptions))["lr"]``.
    """
    return tuple(
        (f.name, field_setting(f).check.ok, field_setting(f).check.requirement)
        for f in flag_fields(cls)
        if field_setting(f).check is not None
    )


def parse_bool(value):
    """argparse type of ``--flag[=BOOL]``: true/false, yes/no, on/off, 1/0, t/f, y/n.

    Example: ``parse_bool("off")  # False``.
    """
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def parse_int_list(value):
    """argparse type of a tuple of positive ints written "16-16-16" (or "16,16,16").

    Example: ``parse_int_list("2-2")  # (2, 2)``.
    """
    parts = str(value).replace(",", "-").split("-")
    try:
        out = tuple(int(v) for v in parts)
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16-16-16, got {value!r}")
    return out


def _base_type(annotation):
    """``X`` of ``Optional[X]``; the annotation itself otherwise."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def _default(field):
    """The default value of a dataclass ``field`` (a fresh one from its factory)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _argparse_kwargs(field, info, bools, as_overrides):
    kind = _base_type(field.type)
    kw = dict(default=None if as_overrides else _default(field), help=info.help)
    if typing.get_origin(kind) is list:  # List[X]: "--name a b c"
        kw["nargs"] = "+"
        kind = (typing.get_args(kind) or (str,))[0]
    if info.nargs is not None:
        kw["nargs"] = info.nargs
    if info.flag == "hidden":
        kw["help"] = argparse.SUPPRESS
    if kind is bool and info.parse is None and info.choices is None:
        if bools == "switch":
            kw["action"] = "store_true"
        else:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
    elif info.parse is not None:
        kw["type"] = info.parse
    elif typing.get_origin(kind) is tuple:
        kw["type"] = parse_int_list
    elif kind in (int, float):
        kw["type"] = kind
    if info.choices is not None:
        kw["choices"] = list(info.choices)
    if info.metavar is not None:
        kw["metavar"] = info.metavar
    return kw


def add_flags(parser, classes, sections=(), bools="value", unset=()):
    """Adds a ``--name`` flag to ``parser`` for every flag field of the dataclasses
    ``classes`` (:func:`flag_fields`), with the field's help, default, choices
    and parser (bool: ``--name[=BOOL]``, or a switch with ``bools="switch"``;
    ``Tuple[int, ...]``: "16-16-16"). The flags of the classes in ``unset``
    default to None ("not set", e.g. the preset's value). Each flag goes into
    the argument group of its field's ``group``: the groups named in
    ``sections`` first, in that order, then the others in order of first use;
    within a group, class by class, field by field. Returns the groups
    (title -> argparse group).

    Example: ``add_flags(parser, [TrainingOptions, FlowConfig], unset=[FlowConfig])``.
    """
    fields = [(cls, f) for cls in classes for f in flag_fields(cls)]

    def section(field):  # None: no group (hidden flags too)
        info = field_setting(field)
        return None if info.flag == "hidden" else info.group

    titles = list(sections)
    titles += dict.fromkeys(
        s for s in map(section, (f for _, f in fields)) if s and s not in titles
    )
    groups = {title: parser.add_argument_group(title) for title in titles}
    ordered = [(c, f) for title in titles for c, f in fields if section(f) == title]
    ordered += [(c, f) for c, f in fields if section(f) is None]
    for cls, field in ordered:
        target = groups[section(field)] if section(field) else parser
        kwargs = _argparse_kwargs(field, field_setting(field), bools, as_overrides=cls in unset)
        target.add_argument(f"--{field.name}", **kwargs)
    return groups


def parse_settings(
    cls,
    argv=None,
    description=None,
    formatter_class=argparse.HelpFormatter,
    bools="switch",
    check=None,
    known=False,
):
    """Parses the command line ``argv`` (default ``sys.argv[1:]``) of a script whose
    options are the dataclass ``cls``: builds the parser (``description``,
    ``formatter_class``; flags from :func:`add_flags`, booleans as switches by
    default), parses, checks every value against its declared :class:`Check`
    ("--lr must be a finite number > 0, got inf") and then the whole instance
    with ``check(options)``, which raises ValueError for a bad combination. A
    failed check is a usage error: argparse prints the message and exits with
    status 2. Returns the ``cls`` instance, or ``(instance, unknown flags)``
    with ``known=True``.

    Example:
    ```python
    from rflow_tf.settings import parse_settings
    from rflow_tf.toy import ToyOptions

    options = parse_settings(ToyOptions, ["--iters", "5", "--quiet"])
    assert options.iters == 5 and options.quiet and options.blocks == 10
    ```
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=formatter_class)
    add_flags(parser, [cls], bools=bools)
    args, extra = parser.parse_known_args(argv) if known else (parser.parse_args(argv), None)
    for name, ok, requirement in flag_checks(cls):
        value = getattr(args, name)
        if value is not None and not ok(value):
            parser.error(f"--{name} must be {requirement}, got {value!r}")
    options = cls(**{name: getattr(args, name) for name in flag_names(cls)})
    if check is not None:
        try:
            check(options)
        except ValueError as e:
            parser.error(str(e))
    return (options, extra) if known else options
