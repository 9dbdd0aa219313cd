"""DecodeAudio: an audio file (path or bytes) -> a ``float32`` waveform, resampled if asked."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from ..checks import is_positive_int
from ..fingerprint import fingerprint
from .common import PathOrBytes, major_minor, open_file, reason, require, source, version

__all__ = ["DecodeAudio"]


class DecodeAudio:
    """Decode an audio file (path or bytes) with soundfile to a ``float32`` waveform in [-1, 1].

    Returns ``[T]`` when ``mono`` (channels mixed by their mean) or ``[C, T]``
    (channels first) otherwise, at ``sample_rate`` Hz: a file at another rate is resampled
    with ``torchaudio.functional.resample`` (default sinc filter), or refused with a
    ``ValueError`` naming the file and both rates when ``resample=False``.

    ``max_seconds`` keeps ``max_frames = floor(max_seconds * sample_rate)`` output samples
    at most, and only the start of the file is decoded: its first
    ``ceil(max_frames * file_rate / sample_rate)`` frames are read, mixed, resampled and
    cut to ``max_frames`` (the resampler sees the cut as the end of the signal).

    Anything libsndfile reads works (WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1,
    AIFF...); ``torchaudio.load`` is not used (it needs torchcodec).

    Fingerprint: every parameter, plus the major.minor versions of soundfile and
    libsndfile (they decode) and, when ``resample``, of torchaudio (its filter).
    """

    # Defined in a submodule, named where it is imported from: the class's module is part of
    # its fingerprint (and of its pickles), which must not change when the code moves.
    __module__ = "cachedata.transforms"

    _REVISION = 1

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        mono: bool = True,
        max_seconds: float | None = None,
        resample: bool = True,
    ) -> None:
        if not is_positive_int(sample_rate):
            raise ValueError(f"DecodeAudio: sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if max_seconds is not None and (
            isinstance(max_seconds, bool)
            or not isinstance(max_seconds, (int, float, np.number))
            or not 0 < float(max_seconds) < math.inf
        ):
            raise ValueError(
                f"DecodeAudio: max_seconds must be a positive number of seconds or None, got {max_seconds!r}"
            )
        self.sample_rate = int(sample_rate)
        self.mono = bool(mono)
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.resample = bool(resample)
        require("soundfile", "audio", "DecodeAudio")

    @property
    def max_frames(self) -> int | None:
        """``max_seconds`` in output samples (None: no limit)."""
        if self.max_seconds is None:
            return None
        return max(1, math.floor(self.max_seconds * self.sample_rate + 1e-6))

    def __call__(self, item: PathOrBytes) -> torch.Tensor:
        sf = require("soundfile", "audio", "DecodeAudio")
        path, buf, name = source(item, "DecodeAudio")
        fh = open_file(path, "DecodeAudio") if path is not None else io.BytesIO(buf)
        with fh:
            try:
                f = sf.SoundFile(fh)
            except (RuntimeError, EOFError, ValueError) as exc:
                raise ValueError(f"DecodeAudio: cannot decode {name}: {_sf_reason(exc)}") from exc
            with f:
                rate = f.samplerate
                if rate != self.sample_rate and not self.resample:
                    raise ValueError(
                        f"DecodeAudio: {name} has a sample rate of {rate} Hz, not the {self.sample_rate} Hz "
                        f"asked for; pass resample=True to resample it, or sample_rate={rate} to keep it"
                    )
                limit = self.max_frames
                frames = -1 if limit is None else -(-limit * rate // self.sample_rate)
                try:
                    data = f.read(frames=frames, dtype="float32", always_2d=True)
                except (RuntimeError, EOFError, ValueError) as exc:
                    raise ValueError(f"DecodeAudio: cannot decode {name}: {_sf_reason(exc)}") from exc
        wave = torch.from_numpy(data.T)  # [C, T]
        if self.mono:
            wave = wave.mean(0)
        if rate != self.sample_rate:
            F = require("torchaudio.functional", "audio", "DecodeAudio")
            wave = F.resample(wave, rate, self.sample_rate)
        if limit is not None:
            wave = wave[..., :limit]
        return wave.contiguous()

    def __cachedata_fingerprint__(self) -> str:
        sf = require("soundfile", "audio", "DecodeAudio")
        return fingerprint(
            {
                "transform": "DecodeAudio",
                "revision": self._REVISION,
                "sample_rate": self.sample_rate,
                "mono": self.mono,
                "max_seconds": self.max_seconds,
                "resample": self.resample,
                "soundfile": version("soundfile"),
                "libsndfile": major_minor(str(getattr(sf, "__libsndfile_version__", "?"))),
                "torchaudio": version("torchaudio") if self.resample else None,
            }
        )

    def __repr__(self) -> str:
        return (
            f"DecodeAudio(sample_rate={self.sample_rate}, mono={self.mono}, "
            f"max_seconds={self.max_seconds}, resample={self.resample})"
        )


def _sf_reason(exc: BaseException) -> str:
    return getattr(exc, "error_string", None) or reason(exc)
