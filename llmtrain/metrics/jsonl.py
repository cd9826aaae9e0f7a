"""metrics.jsonl: one JSON object per optimizer step; truncated on resume so the file stays exact."""

import json
from pathlib import Path


class JsonlWriter:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self._truncate_after(resume_step)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the checkpoint we resume from (they are recomputed identically)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if record.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
