"""Video frames in and out, streamed through ffmpeg (imageio-ffmpeg): memory holds one frame, whatever the length.

:class:`VideoReader` decodes any file ffmpeg reads into ``[H, W, 3]`` uint8 RGB frames; :class:`VideoWriter`
encodes frames to an H.264 MP4. Decoding failures, at opening or mid-stream, are one-line
:class:`~vkd.errors.DataError` s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vkd.errors import DataError

__all__ = ["VIDEO_EXTENSIONS", "is_video", "VideoReader", "VideoWriter"]

# Suffixes taken as videos (anything else is read as an image); ffmpeg decides whether it can decode them.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts",
                    ".3gp")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _ffmpeg_reason(err: BaseException) -> str:
    """The last line ffmpeg wrote (``Error opening input files: Invalid data ...``), not its banner."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class VideoReader:
    """The frames of a video, decoded one at a time.

    Args:
        path: a video file.

    Attributes:
        width: frame width after ffmpeg's rotation handling.
        height: frame height.
        fps: frames per second (0 when the container does not say).
        duration: seconds (0 when unknown).

    Raises:
        DataError: the file is missing or ffmpeg cannot open it, or reports a zero frame size.

    Examples:
        >>> with VideoReader("crowd.mp4") as video:  # doctest: +SKIP
        ...     for frame in video:
        ...         frame.shape
        (720, 1280, 3)
    """

    def __init__(self, path: str | Path):
        import imageio_ffmpeg  # on use: only videos need ffmpeg

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"video not found: {self.path}")
        self._frames = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
        try:
            meta: dict[str, Any] = next(self._frames)
        except Exception as err:  # imageio-ffmpeg raises OSError with ffmpeg's log, RuntimeError on odd streams
            self._frames.close()
            raise DataError(f"cannot decode video {self.path}: {_ffmpeg_reason(err)}") from None
        self.width, self.height = (int(v) for v in meta.get("size", (0, 0)))
        self.fps = float(meta.get("fps") or 0.0)
        duration = meta.get("duration")
        self.duration = float(duration) if isinstance(duration, (int, float)) and math.isfinite(duration) else 0.0
        if self.width <= 0 or self.height <= 0:
            self.close()
            raise DataError(f"video {self.path} has frames of zero size ({self.width}x{self.height})")

    @property
    def frame_estimate(self) -> int:
        """Frames expected from duration × fps (0 when unknown): for progress bars, not a promise."""
        return int(round(self.duration * self.fps)) if self.duration and self.fps else 0

    def __iter__(self) -> Iterator[np.ndarray]:
        size = self.width * self.height * 3
        index = 0
        while True:
            try:
                data = next(self._frames)
            except StopIteration:
                return
            except Exception as err:
                raise DataError(f"{self.path}: decoding failed at frame {index}: {_ffmpeg_reason(err)}") from None
            if len(data) != size:
                raise DataError(f"{self.path}: frame {index} has {len(data)} bytes, expected {size} for "
                                f"{self.width}x{self.height} RGB")
            yield np.frombuffer(data, dtype=np.uint8).reshape(self.height, self.width, 3)
            index += 1

    def close(self) -> None:
        self._frames.close()  # stops the ffmpeg process

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """An H.264 MP4 (yuv420p), written frame by frame; the size is fixed by the first frame.

    yuv420p needs even sides: odd frames are padded by one replicated row/column.

    Args:
        path: the ``.mp4`` to write.
        fps: frames per second of the output.
    """

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.frames = 0
        self._writer: Any = None
        self._size: tuple[int, int] | None = None

    def append(self, frame: np.ndarray) -> None:
        """Add one ``[H, W, 3]`` uint8 frame."""
        import imageio_ffmpeg

        frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._size = (frame.shape[1], frame.shape[0])
            self._writer = imageio_ffmpeg.write_frames(str(self.path), self._size, fps=self.fps, codec="libx264",
                                                       quality=7, macro_block_size=1, ffmpeg_log_level="error")
            self._writer.send(None)  # start ffmpeg
        if (frame.shape[1], frame.shape[0]) != self._size:
            raise ValueError(f"frame of {frame.shape[1]}x{frame.shape[0]} in a {self._size[0]}x{self._size[1]} video")
        self._writer.send(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> Path:
        """Finish the file (a video closed after a failure keeps the frames written so far)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
