"""The event bus: catalogue, dispatcher, decorators, callbacks and commands (no torch here)."""

from trainbus.events.bus import EventBus, HandlerFailure, PlanEntry, Subscription
from trainbus.events.callback import Callback
from trainbus.events.catalog import COMMON_PAYLOAD, EVENTS, EventSpec
from trainbus.events.commands import (
    Command,
    Decision,
    Request,
    SaveCheckpoint,
    SaveTrainingState,
    SkipStep,
    Stop,
    merge,
)
from trainbus.events.marker import Options, on

__all__ = [
    "COMMON_PAYLOAD",
    "EVENTS",
    "Callback",
    "Command",
    "Decision",
    "EventBus",
    "EventSpec",
    "HandlerFailure",
    "Options",
    "PlanEntry",
    "Request",
    "SaveCheckpoint",
    "SaveTrainingState",
    "SkipStep",
    "Stop",
    "Subscription",
    "merge",
    "on",
]
