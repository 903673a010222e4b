"""The raw event contract (docs/design.md §2): the one place that names columns, event types,
senders and the reason codes of quarantined rows. Everything else imports from here."""

from __future__ import annotations

import pyarrow as pa

# Columns of the event table.
USER_ID = "user_id"
TS = "ts"
EVENT_TYPE = "event_type"
SENDER = "sender"
TEXT = "text"
FOOD_IDS = "food_ids"
MEAL = "meal"
VALUE = "value"
CONTENT_ID = "content_id"

REQUIRED_COLUMNS = (USER_ID, TS, EVENT_TYPE)
OPTIONAL_COLUMNS = (SENDER, TEXT, FOOD_IDS, MEAL, VALUE, CONTENT_ID)
ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

# Event types with dedicated streams; any other type is a plain event token.
MESSAGE = "message"
FOOD_LOG = "food_log"
WEIGH_IN = "weigh_in"
CONTENT_VIEW = "content_view"
CORE_EVENT_TYPES = (MESSAGE, FOOD_LOG, WEIGH_IN, CONTENT_VIEW)

SENDER_USER = "user"
SENDER_COACH = "coach"
SENDERS = (SENDER_USER, SENDER_COACH)

MEALS = ("breakfast", "lunch", "dinner", "snack")

# An event type is a short lower-case token; anything else is rejected as invalid.
EVENT_TYPE_PATTERN = r"^[a-z0-9][a-z0-9_.:\-]{0,63}$"

# Side tables.
PROGRAM_START = "program_start"
PROGRAM_END = "program_end"  # optional: a user is eligible only while the program runs
FOOD_ID = "food_id"
AS_OF = "as_of"
LABEL = "label"
# The default label: engaged = active on at least 3 of the 7 days after as_of (docs/design.md
# §3); labels.horizon_days / labels.min_active_days change it per config.
DEFAULT_HORIZON_DAYS = 7
DEFAULT_MIN_ACTIVE_DAYS = 3

# Reason codes, in the order they are checked: a row gets the first that applies.
REASONS = {
    "missing_user_id": "user_id is missing or empty",
    "unknown_user": "user_id is not in the users table",
    "epoch_not_seconds": "ts is an epoch number too large for seconds (>= 1e11, after the year 5000): "
    "milliseconds or finer? The contract takes epoch seconds: divide by 1000, or use ISO-8601",
    "bad_timestamp": "ts is missing, unparseable, or before 1990",
    "future_timestamp": "ts lies further in the future than data.max_future_days",
    "missing_event_type": "event_type is missing or empty",
    "invalid_event_type": "event_type is not a short lower-case token",
    "unknown_event_type": "event_type is not in data.allowed_event_types",
    "message_missing_text": "a message without text",
    "message_unknown_sender": "a message whose sender is missing or not user/coach",
    "food_log_no_foods": "a food log without foods",
    "food_log_bad_food_ids": "a food log with a food id that is not a non-negative integer",
    "weigh_in_missing_value": "a weigh-in without a value",
    "bad_value": "value is present but not a finite number",
    "weigh_in_impossible_value": "a weigh-in outside [data.min_weight_kg, data.max_weight_kg]",
}
QUARANTINE_REASON = "reason"  # plus features.io.SOURCE_FILE / SOURCE_ROW provenance columns

# The normalised form that validation writes and the feature build reads.
NORMALISED_SCHEMA = pa.schema(
    [
        (USER_ID, pa.string()),
        (TS, pa.timestamp("us", tz="UTC")),
        (EVENT_TYPE, pa.string()),
        (SENDER, pa.string()),
        (TEXT, pa.string()),
        (FOOD_IDS, pa.list_(pa.int64())),
        (MEAL, pa.string()),
        (VALUE, pa.float64()),
        (CONTENT_ID, pa.string()),
    ]
)


def is_user_activity(event_type, sender):
    """Vectorised: which events count as the user's own activity (never coach messages)."""
    return ~((event_type == MESSAGE) & (sender == SENDER_COACH))
