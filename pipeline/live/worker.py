"""The generation thread of the client that holds the device.

The session (models, stream state) is used by this thread only, so the event loop never waits
for the DiT or the VAE. Client commands arrive through a queue and are applied between chunks:
that is where a prompt switch takes effect anyway (`Session.set_prompt` applies at the next chunk
boundary), so "switch now" costs at most the chunk in progress. Each chunk's frames are encoded
to JPEG here and put in the client's `Outbox`, which drops frames rather than ever waiting.
"""
from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from memflow.errors import InputError
from pipeline.session import SessionLimitReached

from .downloads import DownloadStore
from .outbox import Outbox, encode_jpeg, frame_message
from .protocol import (
    Command,
    Controls,
    Plan,
    PlannedSwitch,
    SetPrompt,
    Simple,
    Start,
    error_frame,
)
from .settings import ServerSettings

log = logging.getLogger(__name__)

class WorkerState(str, Enum):
    """Where a holder's generation is (the `state` of its status messages)."""

    LOADING = "loading"  # the session's models are being built
    IDLE = "idle"        # no video: `start` begins one
    RUNNING = "running"  # chunk after chunk
    STOPPED = "stopped"  # paused by `stop` (or by its client leaving): `resume` goes on
    LIMIT = "limit"      # the session's limit was reached: `start` a new video
    ERROR = "error"      # a command or a chunk failed: `reset` or `start`


_QUIT = object()
_DETACH = object()
_ATTACHED = object()


@dataclass(frozen=True)
class SwitchRequest:
    """How a prompt switch was asked for: the session hands it back on the chunk the switch
    takes effect at (`ChunkResult.request`), for the switch's latency readouts."""

    received_at: float  # time.monotonic() when the server received it
    chunks_done: int    # chunks finished when the server received it (one may be in progress)
    planned: bool       # from the plan (applied right before its chunk), not "switch now"


class GenerationWorker(threading.Thread):
    """Runs one client's generation: start/stop/reset/prompt/plan/save, chunk after chunk."""

    def __init__(self, get_session: Callable[[], Any], outbox: Outbox, settings: ServerSettings,
                 downloads: DownloadStore, owner_key: str):
        super().__init__(name="memflow-live-generation", daemon=True)
        self._get_session = get_session
        self.outbox = outbox
        self.settings = settings
        self.downloads = downloads
        self.owner_key = owner_key  # whose downloads its saves are
        self._commands: queue.Queue = queue.Queue()
        self.session = None
        self.state = WorkerState.LOADING
        self.note = ""
        self._granted_at = self._idle_since = time.monotonic()
        self._saving = threading.Event()  # one save in flight at a time
        self._clear_video()

    def _clear_video(self) -> None:
        """What the worker keeps of a video besides the session's own: the plan of future
        switches, the last chunk's readouts and the thumbnails sent."""
        self.plan: list[PlannedSwitch] = []
        self.last_chunk: dict[str, Any] | None = None
        self._thumbs: dict[int, str] = {}

    # -- called from the event loop -------------------------------------------------------------
    def submit(self, command: Command) -> None:
        # the chunks finished as the request arrives: a chunk in progress then still finishes
        # under the old prompt, and `switch_chunks` counts it
        self._commands.put((command, time.monotonic(), self._chunks_done()))

    def stop(self) -> None:
        self._commands.put((_QUIT, time.monotonic(), self._chunks_done()))

    def detach(self, grace_s: float) -> None:
        """The client left: pause the stream and keep it for `grace_s` (for `attach`)."""
        self._commands.put((_DETACH, grace_s, self._chunks_done()))

    def attach(self, outbox: Outbox) -> None:
        """A reconnected client takes the stream back: everything goes to its outbox, starting
        with the current status, timeline and memory."""
        self.outbox = outbox
        self._commands.put((_ATTACHED, time.monotonic(), self._chunks_done()))

    def _chunks_done(self) -> int:
        session = self.session
        return 0 if session is None else session.chunks

    def _frames_generated(self) -> int:
        session = self.session
        return 0 if session is None else session.frames_generated

    @property
    def has_video(self) -> bool:
        """A video worth keeping for a reconnecting client has begun."""
        return self._frames_generated() > 0 or self.state in (WorkerState.RUNNING, WorkerState.STOPPED)

    def held_s(self) -> float:
        return time.monotonic() - self._granted_at

    def idle_s(self) -> float:
        """Seconds since this holder last generated (0 while generating)."""
        return 0.0 if self.state == WorkerState.RUNNING else time.monotonic() - self._idle_since

    # -- the thread --------------------------------------------------------------------------------
    def run(self) -> None:
        self._set_state(WorkerState.LOADING, "loading the models")
        try:
            self.session = self._get_session()
            self.session.reset()
        except Exception as e:  # a session that cannot be built: tell the client, end
            log.exception("building the live session failed")
            self._fail(f"the session could not be built: {e}")
            return
        self._set_state(WorkerState.IDLE, "ready: type a prompt and press start")
        while True:
            block = self.state != WorkerState.RUNNING
            try:
                command, received, chunks_done = self._commands.get(block=block)
            except queue.Empty:
                self._step_safely()
                continue
            if command is _QUIT:
                return
            try:
                self._handle(command, received, chunks_done)
            except Exception as e:
                log.exception("live command %r failed", command)
                self._fail(f"{type(command).__name__.lower()} failed: {e}")

    def _fail(self, message: str) -> None:
        self.outbox.put_message(error_frame("generation_failed", message))
        self._set_state(WorkerState.ERROR, message + "; press reset or start to try again")

    def _handle(self, command: Command, received: float, chunks_done: int) -> None:
        if command is _DETACH:
            self._pause(f"stopped: the client left; its stream is kept {received:g} s for it")
        elif command is _ATTACHED:
            self._post_status()
            self._post_timeline()
            self._post_memory()
        elif isinstance(command, Start):
            self._start(command)
        elif isinstance(command, SetPrompt):
            self._set_prompt(command.prompt, received, chunks_done,
                             transition=(command.transition_chunks, command.blend))
        elif isinstance(command, Plan):
            self.plan = list(command.switches)
            self._post_timeline()
        elif isinstance(command, Controls):
            self._controls(command)
        elif isinstance(command, Simple):
            {"stop": self._pause, "resume": self._resume, "reset": self._reset,
             "save": self._save}[command.type]()

    def _start(self, command: Start) -> None:
        plan = self.plan
        start = {} if command.data is None else {command.kind: command.data}
        try:  # drops the previous video
            self.session.start(command.prompt, seed=command.seed, **start)
        except InputError as e:  # an upload that is not a usable image or clip
            self.outbox.put_message(error_frame("bad_upload", str(e)))
            return
        except ValueError as e:  # a prompt or seed the session refuses
            self.outbox.put_message(error_frame("bad_field", str(e)))
            return
        self._clear_video()
        self.plan = plan  # a plan made before starting applies to the new video
        self._send_start_frames()
        self._post_timeline()
        self._set_state(WorkerState.RUNNING, "generating")

    def _send_start_frames(self) -> None:
        """A video started from an image or a clip opens with their frames (before chunk 0)."""
        count = self._frames_generated()
        if not count:
            return
        for k, rgb in enumerate(self.session.start_frames()):
            self.outbox.put_frame(frame_message(rgb, k, 0, self.settings.jpeg_quality))

    def _set_prompt(self, prompt: str, received: float, chunks_done: int,
                    planned: bool = False, transition: tuple[int, str] = (0, "linear")) -> None:
        if self.state in (WorkerState.IDLE, WorkerState.LOADING, WorkerState.ERROR):
            self.outbox.put_message(error_frame("not_started", "start a video first; the "
                                                "prompt of `start` is its first prompt"))
            return
        chunks, blend = transition
        self.session.set_prompt(prompt, SwitchRequest(received, chunks_done, planned),
                                transition_chunks=chunks, blend=blend)
        self._post_status()

    def _controls(self, command: Controls) -> None:
        """Steps and seed apply from the next chunk of the video; the memory view at once."""
        if command.memory_view is not None:
            self.session.memory_view_enabled = command.memory_view
        if command.steps is None and not command.all_steps and command.seed is None:
            self._post_status()
            return
        if self.state in (WorkerState.IDLE, WorkerState.LOADING, WorkerState.ERROR):
            self.outbox.put_message(error_frame("not_started", "steps and seed steer a video: "
                                                "start one first"))
            return
        try:
            if command.steps is not None or command.all_steps:
                self.session.set_steps(None if command.all_steps else list(command.steps))
            if command.seed is not None:
                self.session.set_seed(command.seed)
        except ValueError as e:
            self.outbox.put_message(error_frame("bad_field", str(e)))
        self._post_status()

    def _pause(self, note: str = "stopped: resume to continue this video") -> None:
        if self.state == WorkerState.RUNNING:
            self._set_state(WorkerState.STOPPED, note)

    def _resume(self) -> None:
        if self.state == WorkerState.STOPPED:
            self._set_state(WorkerState.RUNNING, "generating")
        elif self.state == WorkerState.LIMIT:
            self.outbox.put_message(error_frame("at_limit", self.note))
        elif self.state != WorkerState.RUNNING:
            self.outbox.put_message(error_frame("not_started", "nothing to resume; press start"))

    def _reset(self) -> None:
        self.session.reset()
        self._clear_video()
        self._post_timeline()
        self.outbox.put_message({"type": "memory", "sink": [], "bank": [], "window": [], "thumbs": {}})
        self._set_state(WorkerState.IDLE, "reset: ready for a new video")

    def _save(self) -> None:
        if self._frames_generated() == 0:
            self.outbox.put_message(error_frame("nothing_to_save", "no frames generated yet"))
            return
        if self._saving.is_set():
            self.outbox.put_message(error_frame("save_in_progress", "a save is being written; "
                                                "ask again when it is done (`saved`)"))
            return
        file_id, path = self.downloads.reserve(self.owner_key)
        try:
            pending = self.session.prepare_save(path)  # this chunk boundary's frames and timeline
        except Exception:
            self.downloads.discard(file_id)
            raise
        self._saving.set()
        threading.Thread(target=self._finish_save, args=(file_id, pending),
                         name="memflow-live-save", daemon=True).start()

    def _finish_save(self, file_id: str, pending: Any) -> None:
        """Encode on a thread of its own, so that generation goes on while a long video is
        written; the client hears when its files are ready."""
        try:
            mp4, timeline = pending.write()
            self.downloads.keep(self.owner_key, file_id, mp4, timeline)
            self.outbox.put_message({"type": "saved", "id": file_id, "frames": pending.video_frames,
                                     "mp4": f"/download/{file_id}.mp4",
                                     "timeline": f"/download/{file_id}.json"})
        except Exception as e:
            log.exception("saving the live video failed")
            self.downloads.discard(file_id)
            self.outbox.put_message(error_frame("save_failed", f"saving the video failed: {e}"))
        finally:
            self._saving.clear()

    # -- one chunk -----------------------------------------------------------------------------
    def _step_safely(self) -> None:
        try:
            self._step()
        except SessionLimitReached as stop:
            self._set_state(WorkerState.LIMIT, f"stopped at the session limit: {stop}; press "
                            "start for a new video (or download this one)")
        except Exception as e:
            log.exception("live generation failed")
            self._fail(f"generation failed at chunk {self._chunks_done()}: {e}")

    def _apply_due_plan(self) -> None:
        """Apply the latest planned switch whose frame the next chunk has reached (at most one
        switch per chunk: a chunk boundary is the only place a switch can happen)."""
        frames = self._frames_generated()
        due = [s for s in self.plan if s.frame <= frames]
        if not due:
            return
        self.plan = [s for s in self.plan if s.frame > frames]
        self._set_prompt(due[-1].prompt, time.monotonic(), self._chunks_done(), planned=True)

    def _step(self) -> None:
        self._apply_due_plan()
        result = self.session.next_chunk()
        started = time.perf_counter()
        frames = [frame_message(rgb, result.pixel_start + k, result.index, self.settings.jpeg_quality)
                  for k, rgb in enumerate(result.frames)]
        self.outbox.put_message(self._chunk_message(result, time.perf_counter() - started))
        for frame in frames:  # after the chunk's message, so a client knows their prompt
            self.outbox.put_frame(frame)
        self._post_memory()
        self._post_timeline()
        self._post_status()

    def _chunk_message(self, result, encode_s: float) -> dict[str, Any]:
        n = len(result.frames)
        busy = result.generate_s + result.decode_s
        msg = {"type": "chunk", "index": result.index, "latent_start": result.latent_start,
               "pixel_start": result.pixel_start, "frames": n, "prompt": result.prompt,
               "switched": bool(result.switched), "generate_s": result.generate_s,
               "decode_s": result.decode_s, "encode_s": encode_s,
               "gen_fps": n / busy if busy > 0 else None}
        request = result.request
        if isinstance(request, SwitchRequest):
            msg["switch_latency_ms"] = (time.monotonic() - request.received_at) * 1000
            # chunks finished under the old prompt after the request arrived (the one in
            # progress then included): 0 or 1 unless the stream was stopped in between
            msg["switch_chunks"] = result.index - request.chunks_done
            msg["planned"] = request.planned
        self.last_chunk = msg
        return msg

    # -- state messages ------------------------------------------------------------------------
    def _set_state(self, state: WorkerState, note: str) -> None:
        if self.state == WorkerState.RUNNING and state != WorkerState.RUNNING:
            self._idle_since = time.monotonic()
        self.state, self.note = state, note
        self._post_status()

    def _post_status(self) -> None:
        last, session = self.last_chunk or {}, self.session
        self.outbox.put_message({
            "type": "status", "state": self.state.value, "message": self.note,
            "prompt": getattr(session, "prompt", None),
            "pending_prompt": getattr(session, "pending_prompt", None),
            "seed": getattr(session, "seed", None), "chunks": self._chunks_done(),
            "frames_generated": self._frames_generated(),
            "fps": getattr(session, "fps", None), "gen_fps": last.get("gen_fps"),
            "positions": getattr(session, "positions", None),
            "max_latent_frames": getattr(session, "max_latent_frames", None),
            "chunk_ms": (last["generate_s"] + last["decode_s"]) * 1000 if last else None,
            "steps": getattr(session, "steps", None),
            "memory_view": getattr(session, "memory_view_enabled", None),
        })

    def _post_timeline(self) -> None:
        timeline = self.session.timeline if self.session is not None else []
        switches = [{"latent_frame": e.latent_frame, "pixel_frame": e.pixel_frame, "prompt": e.prompt,
                     "transition_chunks": e.transition_chunks, "blend": e.blend}
                    for e in timeline]
        self.outbox.put_message({
            "type": "timeline", "switches": switches, "frames_generated": self._frames_generated(),
            "plan": [{"frame": s.frame, "prompt": s.prompt} for s in self.plan]})

    def _post_memory(self) -> None:
        if not getattr(self.session, "memory_view_enabled", True):
            return
        view = self.session.memory()
        frames = list(dict.fromkeys([*view.sink, *view.bank]))
        self._thumbs = {f: self._thumbs.get(f) or self._thumbnail(f) for f in frames}
        self.outbox.put_message({"type": "memory", "sink": list(view.sink), "bank": list(view.bank),
                                 "window": list(view.window),
                                 "thumbs": {str(f): url for f, url in self._thumbs.items()}})

    def _thumbnail(self, latent_frame: int) -> str:
        rgb = self.session.thumbnail(latent_frame, max_side=self.settings.thumbnail_side)
        data = encode_jpeg(rgb, 80)
        return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
