"""The Lua scripts that route a publish to pub/sub and to every matching stream group atomically,
and that settle a handled stream entry.

Groups are registered in sorted sets indexed by their pattern's first token, so a publish reads
only the set of its subject's first token and the wildcard set (see ``docs/bus.md``, "redis").
"""

from __future__ import annotations

from typing import Final

WILDCARD_INDEX: Final = "*"

# Lua: does `subject` match `pattern` (amb.subjects syntax)? Shared by the scripts below.
_LUA_MATCHES: Final = """
local function split(text)
  local out = {}
  for tok in string.gmatch(text, "[^.]+") do out[#out + 1] = tok end
  return out
end
local function matches(pattern, s)
  local p = split(pattern)
  for i = 1, #p do
    if p[i] == ">" then return #s >= i end
    if i > #s or (p[i] ~= "*" and p[i] ~= s[i]) then return false end
  end
  return #p == #s
end
local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS[1] index of the subject's first token, KEYS[2] wildcard index;
# ARGV: subject, data, stream maxlen. XADD to each live matching group, then PUBLISH.
PUBLISH: Final = (
    _LUA_MATCHES
    + """
local subject = nil
local added = 0
local now = nil
for k = 1, 2 do
  if redis.call("EXISTS", KEYS[k]) == 1 then
    now = now or now_ms()
    subject = subject or split(ARGV[1])
    for _, entry in ipairs(redis.call("ZRANGEBYSCORE", KEYS[k], now, "+inf")) do
      local sp = string.find(entry, " ", 1, true)
      if matches(string.sub(entry, 1, sp - 1), subject) then
        redis.call("XADD", string.sub(entry, sp + 1), "MAXLEN", "~", ARGV[3], "*", "s", ARGV[1], "d", ARGV[2])
        added = added + 1
      end
    end
  end
end
redis.call("PUBLISH", ARGV[1], ARGV[2])
return added
"""
)

# KEYS[1] the pattern's index, KEYS[2] stream; ARGV: index member, group, lease ms (0 = forever).
# Creates the group at "$" before registering it, so no message is added before the group sees it;
# drops the index's expired entries on the way.
REGISTER: Final = (
    _LUA_MATCHES
    + """
local made = redis.pcall("XGROUP", "CREATE", KEYS[2], ARGV[2], "$", "MKSTREAM")
if type(made) == "table" and made.err and not string.find(made.err, "BUSYGROUP", 1, true) then
  return made
end
local now = now_ms()
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", "(" .. now)
local lease = tonumber(ARGV[3])
if lease > 0 then
  redis.call("ZADD", KEYS[1], "GT", now + lease, ARGV[1])
  if redis.call("PTTL", KEYS[2]) < lease + 60000 then redis.call("PEXPIRE", KEYS[2], lease + 60000) end
else
  redis.call("ZADD", KEYS[1], "+inf", ARGV[1])
  redis.call("PERSIST", KEYS[2])
end
return 1
"""
)

# KEYS[1] stream; ARGV: group, entry id. A handled entry: acked, then deleted (one group per
# stream: an acked entry is done). One command a message, where a pipeline of XACK and XDEL cost
# redis-py about a third more client time than a single XACK.
ACK: Final = """
redis.call("XACK", KEYS[1], ARGV[1], ARGV[2])
return redis.call("XDEL", KEYS[1], ARGV[2])
"""


def index_token(subject_or_pattern: str) -> str:
    """The registry index a subject is routed through / a pattern is registered in."""
    first = subject_or_pattern.split(".", 1)[0]
    return WILDCARD_INDEX if first in ("*", ">") else first
