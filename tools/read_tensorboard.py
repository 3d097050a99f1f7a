#!/usr/bin/env python3
"""Prints a run directory's TensorBoard event files as JSON, as the `tensorboard` package reads
them: every event of every file in TensorBoard's (name) order as written, the plugin that
TensorBoard's read-time conversion gives each tag, and what its event accumulator makes of the
directory. The tests hold sagan-train's output to it.

usage: read_tensorboard.py RUN_DIR
"""

import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2


def event_json(event):
    out = {"step": event.step, "kind": event.WhichOneof("what")}
    if out["kind"] == "file_version":
        out["file_version"] = event.file_version
    elif out["kind"] == "session_log":
        out["status"] = event_pb2.SessionLog.SessionStatus.Name(event.session_log.status)
    elif out["kind"] == "summary":
        out["scalars"] = {}
        out["images"] = {}
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out["scalars"][value.tag] = value.simple_value
            elif value.WhichOneof("value") == "image":
                out["images"][value.tag] = {
                    "width": value.image.width,
                    "height": value.image.height,
                    "colorspace": value.image.colorspace,
                    "png": value.image.encoded_image_string.hex(),
                }
    return out


def main():
    run = sys.argv[1]
    names = sorted(n for n in os.listdir(run) if "tfevents" in n)
    paths = [os.path.join(run, name) for name in names]
    files = [
        {
            "name": name,
            "events": [event_json(e) for e in event_file_loader.LegacyEventFileLoader(path).Load()],
        }
        for name, path in zip(names, paths)
    ]
    plugins = {}
    for path in paths:
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.HasField("metadata"):
                    plugins[value.tag] = value.metadata.plugin_data.plugin_name
    acc = event_accumulator.EventAccumulator(
        run, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    accumulator = {
        "scalars": {t: [e.step for e in acc.Scalars(t)] for t in tags["scalars"]},
        "images": {t: [e.step for e in acc.Images(t)] for t in tags["images"]},
    }
    json.dump({"files": files, "plugins": plugins, "accumulator": accumulator}, sys.stdout)


if __name__ == "__main__":
    main()
