"""One photo's way through: supervisor (threads, signals), worker (claim loop and job states), publish (staging,
outbox, failed/, duplicates/), report (assemble, validate, render, index), isolation (the crash-culprit check)."""
