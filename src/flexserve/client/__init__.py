"""A flex-aware client: `FlexClient` over `openai.OpenAI`, `AsyncFlexClient` over
`openai.AsyncOpenAI`, for flexserve and for OpenAI itself.

The policy, for each `chat(...)` or `stream(...)` call (`FlexPolicy` holds the numbers):

1. Send the request with `service_tier="flex"`, a read timeout of `timeout` (900 s by
   default: flex may queue, and the SDK's own default is 600 s), `X-Flex-Max-Wait` if
   `max_wait_header` is set, and the SDK's own retries off (`max_retries=0`), so that a
   refusal is handled here and nowhere else.
2. A `429` with `error.code == "resource_unavailable"` is a refusal: flex could not start
   in time, and nothing was billed. Wait what the server asks (`Retry-After-Ms`, else
   `Retry-After` in seconds or as a date; with neither, `backoff_initial` doubling up to
   `backoff_max`; never less than `min_delay`), then send flex again: as long as that
   wait ends within `wait_budget` seconds of the first attempt. `x-should-retry: false`
   is a hint to the SDK's automatic retries, which are off here; the budget decides.
3. When a wait would end past the budget, stop trying flex at once (sleeping into the
   budget's end could only cost time): with `fallback="default"` send the request once
   at `service_tier="default"`, full price, with the client's own timeout and retries;
   with `fallback="raise"` raise `FlexUnavailableError`, which carries the last
   `retry_after`, the attempts and the time waited, chained to the last refusal.
4. Any other error (a 429 rate limit, a 400, a 5xx, a timeout) is raised as the SDK
   raised it: it is not a refusal of flex, and a flex attempt is not retried for it.

The result tells which tier served (`tier`, the response's own `service_tier`), the
requests sent (`attempts`), whether it `fell_back`, the time slept (`waited_seconds`),
and `cost_usd`: the response's `usage` at that tier's price, from the table given or
read from flexserve's `/v1/flex/quote` once per model; None where neither exists (OpenAI).
A stream asks for its final usage chunk (`stream_options={"include_usage": True}`)
unless the caller set `stream_options`; its tier and cost are known as it is read.
"""

from flexserve.client.aio import AsyncFlexClient
from flexserve.client.policy import FlexPolicy, FlexUnavailableError
from flexserve.client.prices import PriceTable, TierPrice
from flexserve.client.results import AsyncFlexStream, FlexResult, FlexStream
from flexserve.client.sync import FlexClient

__all__ = [
    "AsyncFlexClient",
    "AsyncFlexStream",
    "FlexClient",
    "FlexPolicy",
    "FlexResult",
    "FlexStream",
    "FlexUnavailableError",
    "PriceTable",
    "TierPrice",
]
