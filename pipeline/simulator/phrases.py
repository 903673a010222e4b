"""The words of the simulated chat: message templates per kind and their fillers.

Data only; `text.py` composes messages from it. Templates use `str.format` slots that
`text._slots` fills: {name} {coach} {city} {when} {n} {nw} {food} {food2} {healthy} {meal}
{kg} {w} {pw} {ad} {streak} {reason} {period} {illness} {weekday} {tripkind} {detail}
{lowbit}. A user message is opener + body + closer; check-in replies come in three tones
(+ / 0 / -) chosen from the writer's motivation.
"""

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve").split()
COACH_NAMES = ("Alex", "Jordan", "Sam", "Robin", "Casey", "Morgan", "Jamie", "Taylor")

# --- user messages ------------------------------------------------------------------------
USER_BODIES: dict[str, tuple[str, ...]] = {
    "announce_trip": (
        "heading to {city} {when} for {n} days, probably won't log much",
        "flying to {city} {when}, back in {n} days",
        "I'll be in {city} {when} for about {n} days so expect me to be quiet",
        "travelling to {city} {when} for {nw} days. not sure I'll have time to track",
        "off to {city} {when}! {n} days of {tripkind}. will try to log but no promises",
        "{tripkind} in {city} {when}, gone for {nw} days",
        "just booked {city} for {when}, {n} days away from my kitchen",
        "fyi going away {when} ({city}), probably offline for {n} days",
        "won't be around much, {tripkind} in {city} starting {when}",
        "leaving for {city} {when}. {n} days of eating out 🙈",
        "trip to {city} coming up {when}, {nw} days. any tips for eating on the road?",
        "so I'm going to {city} {when} for {n} days, logging will be patchy",
    ),
    "back": (
        "back from {city}!",
        "just got back from {city}, ate way too much",
        "home again after {city}, time to get back on track",
        "survived {city} 😅 back to logging",
        "back home. {city} was amazing but my diet was not",
    ),
    "busy": (
        "work is crazy {period}",
        "huge deadline at work, {period} will be rough",
        "swamped at the office, might be quiet for a while",
        "crunch time at work {period}, sorry in advance",
        "new project at work is eating all my time",
        "barely have time to eat let alone log, work is nuts",
        "{period} is going to be insane at work",
    ),
    "busy_ahead": (
        "big deadline at work {when}, the next weeks will be crazy",
        "heads up, work gets insane {when}",
        "new project starts {when}, I'll be swamped for a few weeks",
        "crunch time at work starting {when}, might go quiet",
        "we launch {when} so expect me to disappear for a bit",
        "audit season starts {when} 😬 logging will suffer",
    ),
    "quit_notice": (
        "I think I'll take a break from the app after this week",
        "going to pause my membership for a while",
        "this will probably be my last week logging",
        "I'm going to stop tracking for a bit, need a break",
        "honestly thinking of cancelling {when}",
        "not sure I'll continue after {weekday}",
        "I need to step back from all this for a while",
        "might delete the app, it's not working for me",
    ),
    "sick": (
        "down with {illness}",
        "caught {illness}, staying in bed",
        "been sick since {weekday}, {illness}",
        "feeling awful, {illness}",
        "ugh, {illness}. not eating much",
        "sick kids at home and now I have it too",
    ),
    "plateau": (
        "the scale hasn't moved in {pw} weeks",
        "stuck at {w} kg for ages",
        "so frustrated, doing everything right and nothing changes",
        "why am I not losing anything anymore??",
        "{pw} weeks at the same weight. what am I doing wrong",
        "honestly the plateau is killing my motivation",
        "still {w}. starting to wonder if this works",
    ),
    "progress": (
        "down {kg} kg since I started!",
        "lost {kg} kg so far",
        "{w} kg this morning, lowest in years",
        "{kg} kg down, feeling great",
        "the scale says {w}! that's {kg} kg gone",
        "my jeans fit again, {kg} kg down",
    ),
    "low": (
        "honestly struggling to stay motivated",
        "not feeling it this week",
        "why is this so hard",
        "I keep falling off, not sure this works for me",
        "bad week, ate junk every day",
        "finding it hard to keep logging",
        "I don't know, everything feels like a chore lately",
        "maybe this program isn't for me",
        "skipped logging again, no energy for it",
        "feel like I'm failing at this",
    ),
    "high": (
        "feeling great this week",
        "loving the recipes",
        "hit my step goal every day",
        "logged everything today 💪",
        "really enjoying this",
        "best week so far",
        "cooked {food} from scratch, so proud",
        "I actually crave veggies now",
        "had {food} instead of {food2}, small wins",
    ),
    "food_question": (
        "is {food} ok for {meal}?",
        "how many calories in {food}?",
        "can I swap {food} for {food2}?",
        "is {food} a good snack?",
        "what's better, {food} or {food2}?",
        "should I log {food} as {meal}?",
        "how much {food} is one portion?",
        "is it bad that I have {food} every day?",
    ),
    "neutral": (
        "had {food} and {food2} for {meal}",
        "trying a new recipe tonight",
        "forgot to log {meal} yesterday",
        "what's the plan for this week?",
        "{meal} was {food}, logging now",
        "drinking more water like you said",
    ),
    "short": (
        "ok",
        "thanks!",
        "👍",
        "will do",
        "sure",
        "got it",
        "thx",
        "ok thanks",
        "sounds good",
        "🙏",
        "haha yes",
        "yep",
    ),
    "checkin_reply+": (
        "going well! {detail}",
        "good! logged {ad} days this week",
        "all good, {detail}",
        "great actually, {detail}",
        "pretty good week",
        "really good, {detail}",
        "on track! {detail}",
    ),
    "checkin_reply0": (
        "ok I guess",
        "so-so, {detail}",
        "busy but ok",
        "fine, nothing special",
        "could be better, could be worse",
        "alright. {detail}",
        "mixed week",
    ),
    "checkin_reply-": (
        "not great tbh",
        "meh. {lowbit}",
        "pretty bad week honestly",
        "not good, {lowbit}",
        "struggling. {lowbit}",
        "don't ask 😩",
        "terrible, {lowbit}",
    ),
    "nudge_reply": (
        "sorry, been {reason}",
        "yeah I know, I'll get back to it",
        "hi! just {reason}, back now",
        "sorry {coach}, {reason}",
        "oops, {reason}. starting again today",
        "I know I know. {reason}",
    ),
}
OPENERS = (
    "",
    "",
    "",
    "hi!",
    "hey",
    "hey {coach}",
    "hi {coach},",
    "quick update:",
    "so",
    "ok so",
    "update:",
    "hello,",
)
MORNING_OPENERS = ("morning!", "good morning", "morning {coach}")
CLOSERS = ("", "", "", "", "!", ".", "...", " 😊", " lol", " haha", " 🙂", " tbh", " fyi")
TONE_EMOJI = {
    "+": (" 🎉", " 💪", " 😀", " ✨"),
    "-": (" 😞", " 😩", " 😕", " 🙁"),
    "0": ("", " 🤷"),
}

# --- coach messages -----------------------------------------------------------------------
COACH_BODIES: dict[str, tuple[str, ...]] = {
    "welcome": (
        "Welcome {name}! I'm {coach}, your coach. Let's start with logging your meals today.",
        "Hi {name}, I'm {coach} and I'll be your coach. Excited to work with you!",
        "Welcome aboard, {name}! Log a meal or a weigh-in whenever you're ready. - {coach}",
    ),
    "checkin": (
        "Hi {name}! How's your week going?",
        "Morning {name} ☀️ how are things?",
        "Hey {name}, checking in: how did your meals go?",
        "Hi {name}, how are you feeling about your goals this week?",
        "{name}, quick check-in: anything I can help with?",
        "Good morning {name}! Any wins this week?",
        "Hey {name}! How's the logging going?",
    ),
    "nudge": (
        "Hey {name}, haven't seen you in {streak} days, everything ok?",
        "Hi {name}! We miss you, even one meal log today counts.",
        "{name}, it's been a few days. Want to restart with something small?",
        "Hi {name}, just thinking of you. How are things?",
        "Hey {name}, no pressure, but a quick weigh-in would be great when you can.",
    ),
    "reply:announce_trip": (
        "Safe travels, {name}! Enjoy {city}.",
        "Have a great trip {name}! Log when you can, no stress.",
        "Enjoy {city}! Try to pick one healthy meal a day.",
    ),
    "reply:back": ("Welcome back {name}!", "Glad you're back, {name}. Let's ease back in."),
    "reply:busy": (
        "Hang in there {name}, small steps count.",
        "Totally understand. Even a quick log helps, {name}.",
    ),
    "reply:busy_ahead": (
        "Thanks for the heads up {name}! Let's plan a few quick meals.",
        "Good luck with it, {name}. Even one log a day helps.",
    ),
    "reply:quit_notice": (
        "Sorry to hear that {name}. Could a lighter plan help?",
        "I understand, {name}. The door is always open.",
        "Thanks for telling me {name}. Want to talk about what's not working?",
    ),
    "reply:sick": (
        "Oh no, get well soon {name}!",
        "Rest up {name}, the plan will be here when you're better.",
    ),
    "reply:plateau": (
        "Plateaus are normal, {name}. Let's look at your portions together.",
        "Don't give up {name}, the trend matters more than one week.",
    ),
    "reply:progress": (
        "Amazing work {name}! 🎉",
        "That's fantastic progress, {name}!",
        "So proud of you {name}!",
    ),
    "reply:low": (
        "I hear you {name}. What's one small thing we could change?",
        "It's ok to have rough weeks, {name}. I'm here.",
        "Thanks for being honest {name}. Want to set a smaller goal?",
    ),
    "reply:high": ("Love to hear it {name}!", "Great job {name}, keep it up!"),
    "reply:food_question": (
        "Good question {name}! {food} is fine in moderation.",
        "{food} works, {name}, just watch the portion.",
        "Try {healthy} instead if you can, {name}.",
    ),
    "reply:neutral": ("Thanks for the update {name}!", "Nice, {name}.", "Sounds good {name}."),
    "reply:short": ("🙂", "Anytime {name}!", "👍"),
    "reply:checkin_reply": (
        "Thanks {name}!",
        "Good to hear from you {name}.",
        "Thanks for the update, {name}. Keep going!",
    ),
    "reply:nudge_reply": ("No worries {name}, welcome back!", "Glad to hear from you {name}!"),
}

PERIODS = (
    "this week",
    "the next few weeks",
    "this month",
    "until the end of the month",
    "for a while",
)
ILLNESSES = (
    "a cold",
    "the flu",
    "covid",
    "a stomach bug",
    "a bad cold",
    "a migraine",
    "strep throat",
)
TRIP_KINDS = (
    "vacation",
    "work trip",
    "family visit",
    "conference",
    "holiday",
    "road trip",
    "wedding",
)
GOOD_DETAILS = (
    "walked every day",
    "meal prepped on sunday",
    "cut down on soda",
    "tried the new recipes",
    "slept better",
)
BAD_DETAILS = (
    "ate out every night",
    "no time for anything",
    "didn't log at all",
    "stress eating again",
    "skipped the gym",
)
# Why a user went quiet, for replies to a nudge; "" when there was no life event.
QUIET_REASONS = {
    "travel": ("travelling", "on the road", "away on a trip"),
    "busy": ("crazy busy at work", "swamped", "drowning in work"),
    "ill": ("sick", "in bed with a cold", "unwell"),
    "": ("lazy", "busy", "unmotivated honestly", "all over the place"),
}
