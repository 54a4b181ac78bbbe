"""Reading TensorBoard event files back without TensorBoard: the records parsed by hand (length, crc,
tensorboardX's Event protobuf), as TensorBoard's reader interprets them."""

from collections import Counter
from pathlib import Path


def events_of(path: Path):
    """The Events of one event file in order; a torn last record (a killed writer) ends the file."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, at = path.read_bytes(), 0
    while at + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[at : at + 8])
        if at + 12 + n + 4 > len(data):
            break
        yield Event.FromString(data[at + 12 : at + 12 + n])
        at += 12 + n + 4


def read_event_scalars(folder: Path) -> dict:
    """{tag: {step: value}} of the TensorBoard event files of `folder`, read as TensorBoard reads them: files
    in name (time) order, a SessionLog START at step s (a resumed run's purge) drops the steps >= s seen so
    far, a torn last record (a killed writer) ends its file. Records are parsed here (length, crc, Event)."""
    scalars: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in events_of(path):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for steps in scalars.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def count_points(folder: Path) -> Counter:
    """{(tag, step): how many points} over the event files of `folder` (TensorBoard draws every one)."""
    return Counter((value.tag, event.step) for path in sorted(folder.glob("events.out.tfevents.*"))
                   for event in events_of(path) for value in event.summary.value)
