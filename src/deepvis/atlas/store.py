"""The atlas store: one folder with an SQLite index and PNG files.

Layout::

    ATLAS/index.sqlite                       the index (WAL journal; schema version in PRAGMA user_version)
    ATLAS/<layer>/<unit>/top<rank>_crop.png  receptive-field crop of the rank-th top input, as the model saw it
    ATLAS/<layer>/<unit>/top<rank>_view.png  its deconv (or other backprop) view, cropped the same way
    ATLAS/<layer>/<unit>/synth.png           the synthesized image (contrast-stretched for viewing)
    ATLAS/<layer>/<unit>/synth_raw.png       the synthesized image exactly as the model saw it

Crash safety: every file is written to a temporary name and renamed into place, and the rows that
point to files are committed only after the files exist, in one transaction per unit; mining
progress is checkpointed in the index, in one transaction with the list of skipped files. A process
killed at any moment (``kill -9``) leaves at worst some finished files without rows — they are
rewritten, identically, when the job is run again — and stale temporary files, which the next writer
deletes. One writer at a time holds ``ATLAS/.lock``.

Parameters: the atlas records the model (name and a hash of its weights), the dataset (spec and a
hash of its sample keys) and, per layer, the mining, view and synthesis parameters. Running again with
the same parameters resumes; with different ones it stops with an :class:`AtlasError` rather than
mixing or overwriting results. Adding layers (or units) to an atlas is allowed.
"""

from __future__ import annotations

import html
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_path
from ..display import html_table, img_tag, panel
from ..errors import DeepvisError, InputError
from ..models.identity import IDENTITY_KEYS
from ..stats import LayerStats, UnitStats

__all__ = [
    "ATLAS_IDENTITY_KEYS",
    "DEVICE_KEY",
    "AUTOCAST_KEY",
    "SCHEMA_VERSION",
    "INDEX_NAME",
    "AtlasError",
    "AtlasWriter",
    "Atlas",
    "open_atlas",
    "LayerRecord",
    "TopImage",
    "SynthImage",
    "UnitRecord",
    "unit_dir",
]

SCHEMA_VERSION = 1
#: the recorded facts a run must share with the atlas it continues: the model's identity
#: (:data:`deepvis.models.identity.IDENTITY_KEYS`: weights hash and input size) and the dataset's hash
ATLAS_IDENTITY_KEYS: tuple[str, ...] = (*IDENTITY_KEYS, "dataset_hash")
#: the meta key of the device type an atlas is built on (``cpu``, ``cuda``): a resumed build on another is refused
DEVICE_KEY = "device"
#: the meta key of the mining pass's autocast (``"bf16"``, ``"fp16"``, None: off; an atlas without it was
#: mined without autocast): a resumed build with another setting is refused
AUTOCAST_KEY = "autocast"
INDEX_NAME = "index.sqlite"
LOCK_NAME = ".lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers(
    layer TEXT PRIMARY KEY, ord INTEGER NOT NULL, units INTEGER NOT NULL, shape TEXT NOT NULL,
    params TEXT NOT NULL, synth_params TEXT, mined INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS checkpoints(layer TEXT PRIMARY KEY, batches INTEGER NOT NULL, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS skipped(sample INTEGER PRIMARY KEY, key TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats(
    layer TEXT NOT NULL, unit INTEGER NOT NULL, images INTEGER NOT NULL, positions INTEGER NOT NULL,
    sum REAL NOT NULL, sum_sq REAL NOT NULL, sum_max REAL NOT NULL, max REAL, min REAL,
    active_images INTEGER NOT NULL, active_positions INTEGER NOT NULL, zero_positions INTEGER NOT NULL,
    mean REAL, std REAL, mean_max REAL, frac_active REAL, frac_positions_active REAL, frac_zero REAL,
    PRIMARY KEY(layer, unit));
CREATE TABLE IF NOT EXISTS top(
    layer TEXT NOT NULL, unit INTEGER NOT NULL, rank INTEGER NOT NULL, value REAL NOT NULL,
    sample INTEGER NOT NULL, key TEXT NOT NULL, label TEXT, y INTEGER, x INTEGER, crop TEXT, view TEXT,
    PRIMARY KEY(layer, unit, rank));
CREATE TABLE IF NOT EXISTS views(layer TEXT NOT NULL, unit INTEGER NOT NULL, PRIMARY KEY(layer, unit));
CREATE TABLE IF NOT EXISTS synth(
    layer TEXT NOT NULL, unit INTEGER NOT NULL, image TEXT NOT NULL, raw TEXT NOT NULL, value REAL,
    info TEXT NOT NULL, PRIMARY KEY(layer, unit));
"""

_TMP = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


class AtlasError(DeepvisError):
    """An atlas cannot be opened or continued (missing, in use, made with other parameters)."""


def _difference(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs in the identity fact ``key`` between a recorded atlas (``old``) and a run (``new``), in words:
    the model and dataset are named by what the user gave, not by their hashes."""
    if key == "model_hash":
        was = f"model {old.get('model', '?')!r}, weights {old.get('weights', '?')}"
        now = f"model {new.get('model', '?')!r}, weights {new.get('weights', '?')}"
        if "model" not in old:  # an index written without the model's name
            return "with other weights"
        if was == now:
            return f"with other weights ({was}: the same name, other parameter values)"
        return f"with other weights ({was}; this run: {now})"
    if key == "dataset_hash":
        if old.get("dataset") == new.get("dataset"):
            return f"on other images: the dataset {old.get('dataset', '?')!r} has changed since (files added, removed or edited)"
        return f"on other images (dataset {old.get('dataset', '?')!r}; this run: {new.get('dataset', '?')!r})"
    if key == "input_size":
        return f"at input size {old.get(key)}, not {new.get(key)}"
    return f"with {key} {old.get(key)!r}, not {new.get(key)!r}"


def unit_dir(layer: str, unit: int) -> str:
    """The folder (relative to the atlas) holding a unit's files."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", layer)
    return f"{safe}/{unit:04d}"


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


# -- records returned by the reading API ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerRecord:
    """A layer of the atlas: its output ``shape`` (C, H, W) or (C,), the parameters it was built with,
    and whether its mining pass is complete."""

    name: str
    order: int
    units: int
    shape: tuple[int, ...]
    params: dict[str, Any]
    synth_params: dict[str, Any] | None
    mined: bool


@dataclass(frozen=True)
class TopImage:
    """The ``rank``-th (0 = best) input of a unit: its activation ``value`` (spatial maximum), the sample
    (dataset index, key, label), the ``position`` (y, x) of the maximum in the layer's map (None for
    vector layers), and the crop and view files (absolute paths; None until made)."""

    rank: int
    value: float
    sample: int
    key: str
    label: str | None
    position: tuple[int, int] | None
    crop: Path | None
    view: Path | None


@dataclass(frozen=True)
class SynthImage:
    """A unit's synthesized image: display and raw PNGs, the objective value reached, and details."""

    image: Path
    raw: Path
    value: float | None
    info: dict[str, Any]


@dataclass(frozen=True)
class UnitRecord:
    """Everything the atlas holds about one unit."""

    layer: str
    unit: int
    stats: UnitStats | None
    top: list[TopImage]
    synth: SynthImage | None

    def _repr_html_(self) -> str:
        """The unit's pane (IPython's display protocol): its synthesized image, the top inputs' crops and views
        (rank, value, label; gray: not made yet), and its statistics. ``unit_pane`` draws the same as one PNG."""

        def tile(path: Path | None, caption: str) -> str:
            pic = (
                img_tag(path.read_bytes(), width=96)
                if path is not None and path.is_file()
                else "<div style='width:96px;height:96px;background:#3c3c3c'></div>"
            )
            return f"<figure style='margin:0;text-align:center'>{pic}<figcaption>{html.escape(caption)}</figcaption></figure>"

        row = "<div style='display:flex;flex-wrap:wrap;gap:4px;margin:4px 0'>{}</div>"
        synth = tile(self.synth.image if self.synth is not None else None, "synthesized")
        crops = "".join(tile(t.crop, f"{t.rank + 1}: {t.value:.3g} {t.label or ''}") for t in self.top)
        views = "".join(tile(t.view, f"{t.rank + 1}: view") for t in self.top)
        s = self.stats
        stats = (
            html_table(
                [
                    ("mean", s.mean),
                    ("max", s.max),
                    ("mean of maxima", s.mean_max),
                    ("active on", f"{100 * s.frac_active:.0f}% of {s.images} inputs"),
                ]
            )
            if s is not None
            else ""
        )
        return panel(row.format(synth + crops), row.format(views), stats, title=f"{self.layer}:{self.unit}")


# -- reading --------------------------------------------------------------------------------------------


class Atlas:
    """Read an atlas folder (safe while a writer is adding to it)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise AtlasError(f"{self.root} is not an atlas (no {INDEX_NAME}); make one with `deepvis atlas`")
        try:
            self._conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30.0)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise AtlasError(f"cannot read the atlas index {index}: {exc}") from exc
        if version != SCHEMA_VERSION:
            raise AtlasError(f"atlas {self.root} has schema version {version}; this deepvis reads version {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the index."""
        self._conn.close()

    def __enter__(self) -> Atlas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def meta(self) -> dict[str, Any]:
        """Atlas-level facts: model, model hash, dataset, dataset hash, number of samples, ..."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta ORDER BY key")}

    def layers(self) -> list[LayerRecord]:
        """The layers of the atlas, in the model's execution order."""
        rows = self._conn.execute("SELECT layer, ord, units, shape, params, synth_params, mined FROM layers ORDER BY ord, layer")
        return [
            LayerRecord(r[0], r[1], r[2], tuple(json.loads(r[3])), json.loads(r[4]), json.loads(r[5]) if r[5] else None, bool(r[6]))
            for r in rows
        ]

    def layer(self, name: str) -> LayerRecord:
        """The record of layer ``name``; :class:`AtlasError` (listing the atlas's layers) when it has none."""
        for rec in self.layers():
            if rec.name == name:
                return rec
        have = ", ".join(r.name for r in self.layers()) or "none"
        raise AtlasError(f"layer {name!r} is not in atlas {self.root} (it has: {have})")

    def units(self, layer: str) -> list[int]:
        """Units of ``layer`` with top-k entries (every unit, once the layer is mined)."""
        self.layer(layer)
        return [r[0] for r in self._conn.execute("SELECT DISTINCT unit FROM top WHERE layer=? ORDER BY unit", (layer,))]

    def stats(self, layer: str) -> list[UnitStats]:
        """Per-unit statistics of ``layer`` (empty until its mining pass is complete)."""
        self.layer(layer)
        rows = self._conn.execute(
            "SELECT unit, images, positions, sum, sum_sq, sum_max, max, min, active_images, active_positions, zero_positions "
            "FROM stats WHERE layer=? ORDER BY unit",
            (layer,),
        )
        return [UnitStats(layer, *r) for r in rows]

    def unit(self, layer: str, unit: int) -> UnitRecord:
        """The statistics, top inputs (with their crops and views) and synthesized image of one unit."""
        rec = self.layer(layer)
        if not 0 <= unit < rec.units:
            raise AtlasError(f"unit {unit} is out of range: layer {layer} has {rec.units} units (0-{rec.units - 1})")
        st = [
            UnitStats(layer, *r)
            for r in self._conn.execute(
                "SELECT unit, images, positions, sum, sum_sq, sum_max, max, min, active_images, active_positions, zero_positions "
                "FROM stats WHERE layer=? AND unit=?",
                (layer, unit),
            )
        ]
        rows = self._conn.execute(
            "SELECT rank, value, sample, key, label, y, x, crop, view FROM top WHERE layer=? AND unit=? ORDER BY rank", (layer, unit)
        )
        path = lambda p: None if p is None else self.root / p
        top = [TopImage(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else (r[5], r[6]), path(r[7]), path(r[8])) for r in rows]
        s = self._conn.execute("SELECT image, raw, value, info FROM synth WHERE layer=? AND unit=?", (layer, unit)).fetchone()
        synth = SynthImage(self.root / s[0], self.root / s[1], s[2], json.loads(s[3])) if s else None
        return UnitRecord(layer, unit, st[0] if st else None, top, synth)

    def skipped(self) -> list[tuple[int, str, str]]:
        """Inputs that could not be read: (sample index, key, reason)."""
        return [(r[0], r[1], r[2]) for r in self._conn.execute("SELECT sample, key, reason FROM skipped ORDER BY sample")]

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table except checkpoints, sorted (to compare two atlases)."""
        out: dict[str, list[tuple]] = {}
        for table in ("meta", "layers", "skipped", "stats", "top", "views", "synth"):
            out[table] = sorted(self._conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
        return out

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ("ok" when the index is sound)."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]


def open_atlas(root: str | os.PathLike[str]) -> Atlas:
    """Open an atlas folder for reading."""
    return Atlas(root)


# -- writing --------------------------------------------------------------------------------------------


@dataclass
class _Lock:
    path: Path
    fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise AtlasError(f"atlas {self.path.parent} is being written by another process; wait for it or use another folder") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


@dataclass
class AtlasWriter:
    """The one writer of an atlas folder (see the module docs for the guarantees).

    ``meta`` are the atlas-level facts (model, model hash, input size, dataset, dataset hash, device
    type, ...); the keys in ``identity`` must match those already recorded, or :class:`AtlasError` is
    raised. A ``device`` (``"cpu"``, ``"cuda"``) other than the recorded one is refused too, unless
    ``allow_other_device``: results agree across devices only within float rounding, so a resumed
    atlas would mix them (the recorded device stays the one the atlas was started on). An ``autocast``
    other than the recorded one (none recorded: off) is refused the same way, unless ``allow_other_autocast``.
    """

    root: Path
    meta: dict[str, Any]
    identity: Sequence[str] = ATLAS_IDENTITY_KEYS
    allow_other_device: bool = False
    allow_other_autocast: bool = False
    _conn: sqlite3.Connection = field(init=False, repr=False)
    _lock: _Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"atlas output {self.root} exists and is not a folder")
        fresh = not (self.root / INDEX_NAME).exists()
        if fresh and self.root.is_dir() and any(p.name != LOCK_NAME for p in self.root.iterdir()):
            raise AtlasError(f"{self.root} is a non-empty folder that is not an atlas; give a new or empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _Lock(self.root / LOCK_NAME)
        self._lock.acquire()
        try:
            try:
                self._conn = _connect(self.root / INDEX_NAME)
                self._init()
            except sqlite3.DatabaseError as exc:  # a damaged index: said in one line, the folder left as it is
                raise AtlasError(f"cannot continue the atlas {self.root}: its index {INDEX_NAME} cannot be read ({exc})") from exc
            self._remove_stale_temp_files()
        except BaseException:
            self._lock.release()
            raise

    def _init(self) -> None:
        c = self._conn
        version = c.execute("PRAGMA user_version").fetchone()[0]
        c.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise AtlasError(f"atlas {self.root} has schema version {version}; this deepvis writes version {SCHEMA_VERSION}")
            old = {k: json.loads(v) for k, v in c.execute("SELECT key, value FROM meta")}
            diff = [k for k in self.identity if k in old and old[k] != self.meta.get(k)]
            if diff:
                raise AtlasError(
                    f"atlas {self.root} was made {_difference(diff[0], old, self.meta)}; "
                    "use the same model and dataset to continue it, or another output folder"
                )
            was, now = old.get(DEVICE_KEY), self.meta.get(DEVICE_KEY)
            if was is not None and now is not None and was != now and not self.allow_other_device:
                raise AtlasError(
                    f"atlas {self.root} was built on {was}, this run is on {now}: results differ across devices within float "
                    f"rounding, so the atlas would mix them; continue it on {was} (--device), or allow it (--allow-other-device)"
                )
            was, now = old.get(AUTOCAST_KEY), self.meta.get(AUTOCAST_KEY)
            if old and AUTOCAST_KEY in self.meta and was != now and not self.allow_other_autocast:
                raise AtlasError(
                    f"atlas {self.root} was mined with autocast {was or 'off'}, this run with {now or 'off'}: the atlas would "
                    f"mix precisions; continue it with {'--autocast ' + was if was else 'no --autocast'}, or allow it (--allow-other-autocast)"
                )
            for k, v in self.meta.items():
                if k not in old:  # recorded once, by the run that created the atlas
                    c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (k, _json(v)))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _remove_stale_temp_files(self) -> None:
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if _TMP.match(f):
                    os.unlink(os.path.join(dirpath, f))

    def close(self) -> None:
        """Checkpoint the journal into the index and release the lock."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
        finally:
            self._lock.release()

    def __enter__(self) -> AtlasWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self):
        return _Transaction(self._conn)

    # -- layers and parameters ------------------------------------------------------------------------
    def ensure_layer(self, layer: str, order: int, shape: Sequence[int], params: dict[str, Any]) -> None:
        """Record ``layer`` or check that it was recorded with the same shape and parameters."""
        row = self._conn.execute("SELECT shape, params FROM layers WHERE layer=?", (layer,)).fetchone()
        if row is None:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO layers(layer, ord, units, shape, params) VALUES (?, ?, ?, ?, ?)",
                    (layer, order, int(shape[0]), _json(list(shape)), _json(params)),
                )
            return
        old_shape, old = json.loads(row[0]), json.loads(row[1])
        if old_shape != list(shape):
            raise AtlasError(f"layer {layer} of atlas {self.root} has shape {old_shape}, not {list(shape)}: another input size?")
        _check_params(self.root, layer, old, params)

    def ensure_synth_params(self, layer: str, params: dict[str, Any]) -> None:
        """Record the synthesis parameters of ``layer`` or check they match those recorded."""
        row = self._conn.execute("SELECT synth_params FROM layers WHERE layer=?", (layer,)).fetchone()
        if row is None:
            raise KeyError(layer)
        if row[0] is None:
            with self._tx() as c:
                c.execute("UPDATE layers SET synth_params=? WHERE layer=?", (_json(params), layer))
            return
        _check_params(self.root, layer, json.loads(row[0]), params)

    def mined(self, layer: str) -> bool:
        """Whether the mining pass of ``layer`` is complete (its top-k and statistics recorded)."""
        row = self._conn.execute("SELECT mined FROM layers WHERE layer=?", (layer,)).fetchone()
        return bool(row and row[0])

    # -- mining --------------------------------------------------------------------------------------
    def load_checkpoint(self, layer: str, device: Any = "cpu") -> LayerStats | None:
        """The last saved mining state of ``layer`` (on ``device``), or None."""
        row = self._conn.execute("SELECT state FROM checkpoints WHERE layer=?", (layer,)).fetchone()
        return LayerStats.from_bytes(layer, row[0], device) if row else None

    def save_progress(self, states: Iterable[LayerStats], skipped: Iterable[tuple[int, str, str]]) -> None:
        """Checkpoint mining states and the files skipped so far, in one transaction."""
        with self._tx() as c:
            for st in states:
                c.execute(
                    "INSERT OR REPLACE INTO checkpoints(layer, batches, state) VALUES (?, ?, ?)", (st.layer, len(st.done), st.to_bytes())
                )
            c.executemany("INSERT OR REPLACE INTO skipped(sample, key, reason) VALUES (?, ?, ?)", list(skipped))

    def finish_mining(self, states: Iterable[LayerStats], samples: Sequence[Any], skipped: Iterable[tuple[int, str, str]]) -> None:
        """Record the final top-k and statistics of finished layers (one transaction) and drop their checkpoints.

        ``samples`` is the dataset's sample list (for keys and labels).
        """
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO skipped(sample, key, reason) VALUES (?, ?, ?)", list(skipped))
            for st in states:
                c.execute("DELETE FROM stats WHERE layer=?", (st.layer,))
                c.execute("DELETE FROM top WHERE layer=?", (st.layer,))
                c.executemany(
                    "INSERT INTO stats VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            s.layer,
                            s.unit,
                            s.images,
                            s.positions,
                            s.sum,
                            s.sum_sq,
                            s.sum_max,
                            _finite_or_none(s.max),
                            _finite_or_none(s.min),
                            s.active_images,
                            s.active_positions,
                            s.zero_positions,
                            _finite_or_none(s.mean),
                            _finite_or_none(s.std),
                            _finite_or_none(s.mean_max),
                            _finite_or_none(s.frac_active),
                            _finite_or_none(s.frac_positions_active),
                            _finite_or_none(s.frac_zero),
                        )
                        for s in st.unit_stats()
                    ],
                )
                rows = []
                for u in range(st.units):
                    for rank, (value, sample, pos) in enumerate(st.top(u)):
                        smp = samples[sample]
                        rows.append((st.layer, u, rank, value, sample, smp.key, smp.label, *(pos if pos else (None, None))))
                c.executemany(
                    "INSERT INTO top(layer, unit, rank, value, sample, key, label, y, x) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )
                c.execute("UPDATE layers SET mined=1 WHERE layer=?", (st.layer,))
                c.execute("DELETE FROM checkpoints WHERE layer=?", (st.layer,))

    def skipped(self) -> list[tuple[int, str, str]]:
        """Inputs that could not be read so far: (sample index, key, reason)."""
        return [(r[0], r[1], r[2]) for r in self._conn.execute("SELECT sample, key, reason FROM skipped ORDER BY sample")]

    # -- views ---------------------------------------------------------------------------------------
    def top_entries(self, layer: str, unit: int) -> list[tuple[int, int, tuple[int, int] | None, float]]:
        """(rank, sample, position, value) of a unit's top-k."""
        rows = self._conn.execute("SELECT rank, sample, y, x, value FROM top WHERE layer=? AND unit=? ORDER BY rank", (layer, unit))
        return [(r[0], r[1], None if r[2] is None else (r[2], r[3]), r[4]) for r in rows]

    def units_without_views(self, layer: str, units: Iterable[int]) -> list[int]:
        """Those of ``units`` whose crops and views are not recorded yet (in the given order)."""
        done = {r[0] for r in self._conn.execute("SELECT unit FROM views WHERE layer=?", (layer,))}
        return [u for u in units if u not in done]

    def write_views(self, layer: str, unit: int, crops: Sequence[bytes | None], views: Sequence[bytes | None]) -> None:
        """Write a unit's crop and view PNGs (rank order), then commit their paths."""
        d = unit_dir(layer, unit)
        paths: list[tuple[str | None, str | None]] = []
        for rank, (crop, view) in enumerate(zip(crops, views)):
            cp = self._write(f"{d}/top{rank:02d}_crop.png", crop)
            vp = self._write(f"{d}/top{rank:02d}_view.png", view)
            paths.append((cp, vp))
        with self._tx() as c:
            c.executemany(
                "UPDATE top SET crop=?, view=? WHERE layer=? AND unit=? AND rank=?",
                [(cp, vp, layer, unit, r) for r, (cp, vp) in enumerate(paths)],
            )
            c.execute("INSERT OR REPLACE INTO views(layer, unit) VALUES (?, ?)", (layer, unit))

    # -- synthesis -----------------------------------------------------------------------------------
    def units_without_synth(self, layer: str, units: Iterable[int]) -> list[int]:
        """Those of ``units`` without a recorded synthesized image (in the given order)."""
        done = {r[0] for r in self._conn.execute("SELECT unit FROM synth WHERE layer=?", (layer,))}
        return [u for u in units if u not in done]

    def write_synth(self, layer: str, unit: int, image: bytes, raw: bytes, value: float | None, info: dict[str, Any]) -> None:
        """Write a unit's synthesized images, then commit their row."""
        d = unit_dir(layer, unit)
        ip = self._write(f"{d}/synth.png", image)
        rp = self._write(f"{d}/synth_raw.png", raw)
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO synth VALUES (?, ?, ?, ?, ?, ?)", (layer, unit, ip, rp, _finite_or_none(value), _json(info)))

    def _write(self, rel: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        with atomic_path(self.root / rel) as tmp:
            tmp.write_bytes(data)
        return rel


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _finite_or_none(x: float | None) -> float | None:
    """``x`` as a float when it is finite, else None (SQL NULL: SQLite has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def _check_params(root: Path, layer: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        parts = ", ".join(f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in diff)
        raise AtlasError(f"layer {layer} of atlas {root} was made with {parts}; rerun with the same options or use another output folder")
