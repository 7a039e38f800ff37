"""The Lua scripts behind RedisSessionStore: every check-and-change is one script, so it is atomic across
replicas. Each script is PRELUDE + its body.

Every script touches keys of ONE hash slot, so the same scripts run on a single Redis and on a Redis
Cluster. A session's keys and the index shard it belongs to share the hash tag {T}, T being the first hex
digit of the session id (16 shards): the expiry index and the end queue are split into 16 sorted sets
(one per shard, each living with its sessions), so opening, touching, closing and expiring a session stay
one script. A user's quota keys share the tag {u:H}, H a digest of the user id (the id itself may hold
braces). Session state and quota state are thus in different slots: BeginTurn and EndTurn, which change
both, are several scripts in an order that never loses or double counts (RedisSessionStore.begin_turn,
.end_turn).

Layout (P = the key prefix, S = a session id, T = S's first character, U = a user id, H = its tag digest;
times are Redis server milliseconds, from TIME, so replicas never compare their own clocks):

- P{T}:session:S   hash: user, conv, model, prompt, persona, created_ms, expires_ms, last_seq,
                turn, owner, lease_ms (the session's turn: kept after its lease ran out until EndTurn or a
                takeover, but then no longer running), cancel ("<interrupt 0|1>:<played_ms>" once the turn
                was asked to stop, else absent or empty), voice (opaque bytes; absent in sessions written
                before it existed, which read as empty)
- P{T}:log:S       stream: entry `<seq>-0` per event (fields turn, payload, terminal). Entries `<seq>-<n>`
                with n > 0 are control entries (EndTurn, close, expiry) that only wake blocked readers;
                readers skip them.
- P{T}:turns:S     hash: turn id -> "begun" | "counting" | "ended" (no restart of an ended turn; "counting":
                   ended, its usage being added to the user's quota), for only the newest MAX_REMEMBERED_TURNS
                   turns (session_service/store.py) and the active one
- P{T}:turnorder:S list: the turn ids of P{T}:turns:S, oldest first, so the oldest state is the one forgotten
- P{T}:expiries    sorted set: the shard's session ids scored by expires_ms; the sweepers' index
- P{T}:ended       sorted set: the shard's session ids whose end awaits recording, scored by when to try next
- P{T}:ended:S     hash: user, conv, created_ms, ended_ms, attempts (the record to deliver)
- P{u:H}:quota:messages:U  sorted set: the user's messages in the last minute (member = session:turn)
- P{u:H}:quota:tokens:U    hash: day (days since epoch, UTC), used
- P{u:H}:quota:audio:U     hash: day (days since epoch, UTC), used (milliseconds of audio)
- P{u:H}:quota:counted:U   set: the turns (session:turn) whose usage was added, so a retried EndTurn adds
                           it once; goes two UTC midnights after it was last written
- P cancels:O   channel: cancel requests for the turns gateway O runs ("<sid> <turn> <interrupt> <ms>");
                pub/sub on a single Redis, sharded pub/sub (SPUBLISH / SSUBSCRIBE) on a cluster

Per-session keys carry Redis TTLs of the session TTL plus a grace period: the sweeper decides expiry
(it must record the end first); Redis' TTL only removes what no sweeper got to, e.g. all replicas down.
"""

PRELUDE = r"""
local MINUTE_MS = 60000
local DAY_MS = 86400000
-- After a close or expiry the log lingers this long so readers blocked in XREAD wake on the control
-- entry (a deleted stream would not wake them) and see the session gone.
local CLOSED_LOG_LINGER_MS = 5000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function int(n)
  return string.format('%d', n)
end

local function load_hash(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

-- RedisKeys in redis_store.py builds the same names.
local function keys_of(prefix, sid)
  local p = prefix .. '{' .. string.sub(sid, 1, 1) .. '}:'
  return {
    session = p .. 'session:' .. sid, log = p .. 'log:' .. sid, turns = p .. 'turns:' .. sid,
    turn_order = p .. 'turnorder:' .. sid, expiries = p .. 'expiries', ended = p .. 'ended',
    ended_record = p .. 'ended:' .. sid,
  }
end

-- Session scripts get these declared keys first, in this order (RedisKeys.of_session); a script for
-- several sessions gets them one session after the other, the next session's starting at KEYS[base + 1].
local SESSION_KEY_COUNT = 7
local function declared_keys(base)
  local b = base or 0
  return {
    session = KEYS[b + 1], log = KEYS[b + 2], turns = KEYS[b + 3], turn_order = KEYS[b + 4], expiries = KEYS[b + 5],
    ended = KEYS[b + 6], ended_record = KEYS[b + 7],
  }
end

-- Missing or past its expiry: callers see no session. Expired ones are left for a sweeper to claim.
local function live_session(k, now)
  local s = load_hash(k.session)
  if s == nil or tonumber(s.expires_ms) <= now then return nil end
  return s
end

local function owned_session(k, user, now)
  local s = live_session(k, now)
  if s == nil or s.user ~= user then return nil end
  return s
end

local function turn_running(s, now)
  return s.turn ~= '' and tonumber(s.lease_ms) > now
end

-- The sliding TTL: the logical expiry and the sweepers' index move together.
local function touch(k, sid, s, now, ttl_ms, grace_ms)
  local expires = now + ttl_ms
  s.expires_ms = int(expires)
  redis.call('HSET', k.session, 'expires_ms', s.expires_ms)
  redis.call('ZADD', k.expiries, expires, sid)
  redis.call('PEXPIRE', k.session, ttl_ms + grace_ms)
  redis.call('PEXPIRE', k.log, ttl_ms + grace_ms)
  redis.call('PEXPIRE', k.turns, ttl_ms + grace_ms)
  redis.call('PEXPIRE', k.turn_order, ttl_ms + grace_ms)
end

-- Marks turn_id (the active turn) begun and forgets the oldest turn states beyond max_turns, so a session
-- that stays active for thousands of turns keeps a bounded record. Forgetting is safe: turn ids are fresh
-- UUIDs from the gateway, and a BeginTurn/EndTurn replayed for a turn that ended max_turns turns ago is not
-- a realistic case. The active turn is never forgotten.
local function remember_turn(k, turn_id, max_turns)
  if redis.call('HSET', k.turns, turn_id, 'begun') == 1 then redis.call('RPUSH', k.turn_order, turn_id) end
  local remembered = redis.call('HLEN', k.turns)
  if remembered > redis.call('LLEN', k.turn_order) then
    -- States without a place in the order (written before it existed): they are the oldest.
    local listed = {}
    for _, id in ipairs(redis.call('LRANGE', k.turn_order, 0, -1)) do listed[id] = true end
    for _, id in ipairs(redis.call('HKEYS', k.turns)) do
      if not listed[id] then redis.call('LPUSH', k.turn_order, id) end
    end
  end
  -- Visits each listed id at most once, so it ends whatever the two keys hold.
  for _ = 1, redis.call('LLEN', k.turn_order) do
    if remembered <= max_turns then break end
    local oldest = redis.call('LPOP', k.turn_order)
    if oldest == turn_id then
      redis.call('RPUSH', k.turn_order, oldest)
    else
      remembered = remembered - redis.call('HDEL', k.turns, oldest)
    end
  end
end

local function info(s, now)
  -- `or ''`: a nil would cut the reply short.
  return {'OK', int(now), s.user, s.conv, s.model, s.prompt, s.persona, s.created_ms, s.expires_ms,
          s.last_seq, s.turn, s.owner, s.lease_ms, s.voice or ''}
end

-- A control entry sorts after the data entry <last_seq>-0 and before <last_seq + 1>-0.
local function wake_followers(k, s)
  redis.call('XADD', k.log, s.last_seq .. '-*', 'control', '1')
end

local function end_session(k, sid, s, ended_ms, now, record)
  redis.call('ZREM', k.expiries, sid)
  if record == '1' then
    redis.call('HSET', k.ended_record, 'user', s.user, 'conv', s.conv, 'created_ms', s.created_ms,
               'ended_ms', int(ended_ms), 'attempts', '0')
    redis.call('ZADD', k.ended, now, sid)
  end
  wake_followers(k, s)
  redis.call('DEL', k.session, k.turns, k.turn_order)
  redis.call('PEXPIRE', k.log, CLOSED_LOG_LINGER_MS)
end

-- A daily counter (tokens, audio ms): a hash of day and used; another day's count reads as 0.
local function used_today(key, day)
  local h = redis.call('HMGET', key, 'day', 'used')
  if h[1] and tonumber(h[1]) == day then return tonumber(h[2]) end
  return 0
end

-- Lua numbers are doubles, exact up to 2^53, and '%d' wraps beyond 2^63: an uncapped huge count (uint64 on
-- the wire) would be stored NEGATIVE and lift the quota. Capped, it simply exhausts any real limit.
local MAX_DAILY_COUNT = 9007199254740992

-- Adds to today's count; the key goes at the next UTC midnight, when the count starts afresh anyway.
local function add_today(key, day, amount)
  if amount <= 0 then return end
  local used = math.min(MAX_DAILY_COUNT, used_today(key, day) + amount)
  redis.call('HSET', key, 'day', int(day), 'used', int(used))
  redis.call('PEXPIREAT', key, int((day + 1) * DAY_MS))
end

local function remaining_or_unlimited(limit, used)
  if limit <= 0 then return '-1' end
  return int(math.max(0, limit - used))
end

-- Whole seconds rounded up, so 0 only once nothing is left (session_service/quota.py).
local function audio_seconds_remaining(limit_ms, used_ms)
  if limit_ms <= 0 then return '-1' end
  return int(math.max(0, math.ceil((limit_ms - used_ms) / 1000)))
end
"""

# KEYS: session keys. ARGV: sid, user, conv, model, prompt, persona, ttl_ms, grace_ms, voice
OPEN_NEW = r"""
local k = declared_keys()
local sid, ttl_ms, grace_ms = ARGV[1], tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()
local s = {user = ARGV[2], conv = ARGV[3], model = ARGV[4], prompt = ARGV[5], persona = ARGV[6],
           created_ms = int(now), last_seq = '0', turn = '', owner = '', lease_ms = '0', voice = ARGV[9]}
redis.call('HSET', k.session, 'user', s.user, 'conv', s.conv, 'model', s.model, 'prompt', s.prompt,
           'persona', s.persona, 'created_ms', s.created_ms, 'last_seq', s.last_seq, 'turn', s.turn,
           'owner', s.owner, 'lease_ms', s.lease_ms, 'voice', s.voice)
touch(k, sid, s, now, ttl_ms, grace_ms)
return info(s, now)
"""

# KEYS: session keys. ARGV: sid, user, model, prompt, persona, ttl_ms, grace_ms
REOPEN = r"""
local k = declared_keys()
local sid, user, ttl_ms, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local s = owned_session(k, user, now)
if s == nil then return {'NOT_FOUND'} end
local changes = {model = ARGV[3], prompt = ARGV[4], persona = ARGV[5]}
for name, value in pairs(changes) do
  if value ~= '' then
    s[name] = value
    redis.call('HSET', k.session, name, value)
  end
end
touch(k, sid, s, now, ttl_ms, grace_ms)
return info(s, now)
"""

# KEYS: session keys. ARGV: sid, user, voice, ttl_ms, grace_ms. Replaces the voice options (a use: touches).
UPDATE = r"""
local k = declared_keys()
local sid, user, ttl_ms, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local s = owned_session(k, user, now)
if s == nil then return {'NOT_FOUND'} end
s.voice = ARGV[3]
redis.call('HSET', k.session, 'voice', s.voice)
touch(k, sid, s, now, ttl_ms, grace_ms)
return info(s, now)
"""

# KEYS: session keys. ARGV: user
GET = r"""
local k = declared_keys()
local now = now_ms()
local s = owned_session(k, ARGV[1], now)
if s == nil then return {'NOT_FOUND'} end
return info(s, now)
"""

# KEYS: session keys. ARGV: sid, user, record ('1' to queue the end for history_service)
CLOSE = r"""
local k = declared_keys()
local now = now_ms()
local s = owned_session(k, ARGV[2], now)
if s == nil then return {'NOT_FOUND'} end
end_session(k, ARGV[1], s, now, now, ARGV[3])
return {'OK'}
"""

# KEYS: session keys. ARGV: sid, user, turn, owner, ttl_ms, grace_ms, lease_ms, max_turns, quota_held ('1' when
# the caller holds the new turn's quota, or no quota applies).
# Returns OK last_seq taken_over_turn cancel | NEEDS_QUOTA (a new turn the session would start; nothing
# changed) | BUSY | TURN_ENDED | NOT_FOUND. A retry of the session's own turn renews its lease: OK.
BEGIN_TURN = r"""
local k = declared_keys()
local sid, user, turn_id, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl_ms, grace_ms, lease_ms, max_turns = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()
local s = owned_session(k, user, now)
if s == nil then return {'NOT_FOUND'} end

local taken_over, cancel = '', s.cancel or ''
if s.turn ~= turn_id then
  -- A new turn (not a retry of the session's own): every check that can refuse, then the quota.
  if turn_running(s, now) then return {'BUSY'} end
  local state = redis.call('HGET', k.turns, turn_id)
  if state == 'ended' or state == 'counting' then return {'TURN_ENDED'} end
  if ARGV[9] ~= '1' then return {'NEEDS_QUOTA'} end
  taken_over, cancel = s.turn, ''
end
redis.call('HSET', k.session, 'turn', turn_id, 'owner', owner, 'lease_ms', int(now + lease_ms), 'cancel', cancel)
remember_turn(k, turn_id, max_turns)
touch(k, sid, s, now, ttl_ms, grace_ms)
return {'OK', s.last_seq, taken_over, cancel}
"""

# KEYS: messages window, tokens counter, audio counter. ARGV: member (session:turn), messages_per_minute,
# tokens_per_day, audio_ms_per_day, uses_audio ('1' for a turn that hears or speaks audio), take ('1': count
# the turn's message; '0': only report).
# Returns OK messages_remaining tokens_remaining audio_seconds_remaining fresh ('1' when this call counted
# the message) | TOKENS retry_ms | AUDIO retry_ms | MESSAGES retry_ms. A refusal changes nothing (beyond
# forgetting messages older than the window). A turn already in the window is not counted or refused again.
TAKE_QUOTA = r"""
local window_key, tokens_key, audio_key = KEYS[1], KEYS[2], KEYS[3]
local member, message_limit, token_limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local audio_limit_ms, uses_audio, take = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6] == '1'
local now = now_ms()
local day = math.floor(now / DAY_MS)
local tokens_used = used_today(tokens_key, day)
local audio_used = used_today(audio_key, day)
local sent = 0
if message_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', window_key, '-inf', now - MINUTE_MS)
  sent = redis.call('ZCARD', window_key)
end

local fresh = '0'
if take and not (message_limit > 0 and redis.call('ZSCORE', window_key, member)) then
  if token_limit > 0 and tokens_used >= token_limit then
    return {'TOKENS', int((day + 1) * DAY_MS - now)}
  end
  -- Only a turn that hears or speaks audio is refused by the audio quota; text turns go on.
  if uses_audio and audio_limit_ms > 0 and audio_used >= audio_limit_ms then
    return {'AUDIO', int((day + 1) * DAY_MS - now)}
  end
  if message_limit > 0 then
    if sent >= message_limit then
      local oldest = tonumber(redis.call('ZRANGE', window_key, 0, 0, 'WITHSCORES')[2])
      return {'MESSAGES', int(oldest + MINUTE_MS - now)}
    end
    redis.call('ZADD', window_key, now, member)
    redis.call('PEXPIRE', window_key, MINUTE_MS)
    sent = sent + 1
    fresh = '1'
  end
end
return {'OK', remaining_or_unlimited(message_limit, sent), remaining_or_unlimited(token_limit, tokens_used),
        audio_seconds_remaining(audio_limit_ms, audio_used), fresh}
"""

# KEYS: messages window. ARGV: member. Gives back a message TAKE_QUOTA counted for a turn that did not begin.
GIVE_BACK_QUOTA = r"""
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: session keys. ARGV: sid, user, turn ('' = the running one), interrupt ('0' | '1'), played_ms
# Returns OK turn owner | NONE (no turn, or not that one, runs) | NOT_FOUND. The caller publishes to the owner.
REQUEST_CANCEL = r"""
local k = declared_keys()
local turn_id = ARGV[3]
local now = now_ms()
local s = owned_session(k, ARGV[2], now)
if s == nil then return {'NOT_FOUND'} end
if not turn_running(s, now) or (turn_id ~= '' and turn_id ~= s.turn) then return {'NONE'} end
redis.call('HSET', k.session, 'cancel', ARGV[4] .. ':' .. ARGV[5])
return {'OK', s.turn, s.owner}
"""

# KEYS: session keys. ARGV: sid, turn, ttl_ms, grace_ms, has_usage ('1' when the turn used tokens or audio).
# Returns OK count user: count '1' when the caller must add the turn's usage to the user's quota (ADD_USAGE,
# then TURN_COUNTED); the turn stays "counting" until then, so a retried EndTurn counts it still (ADD_USAGE
# adds it once). | NOT_FOUND
END_TURN = r"""
local k = declared_keys()
local sid, turn_id, ttl_ms, grace_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local s = live_session(k, now)
if s == nil then return {'NOT_FOUND'} end
local count = '0'
local state = redis.call('HGET', k.turns, turn_id)
if state == 'begun' or state == 'counting' then
  if ARGV[5] == '1' then
    count = '1'
    redis.call('HSET', k.turns, turn_id, 'counting')
  else
    redis.call('HSET', k.turns, turn_id, 'ended')
  end
end
if s.turn == turn_id then
  redis.call('HSET', k.session, 'turn', '', 'owner', '', 'lease_ms', '0', 'cancel', '')
  wake_followers(k, s)
  touch(k, sid, s, now, ttl_ms, grace_ms)
end
return {'OK', count, s.user}
"""

# KEYS: tokens counter, audio counter, counted set. ARGV: member (session:turn), tokens, audio_ms.
# Adds a turn's usage to today's counts once, however often it is called. Returns 1 when it added.
ADD_USAGE = r"""
local now = now_ms()
local day = math.floor(now / DAY_MS)
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return 0 end
-- Two midnights: a retry just after midnight still finds the turn counted.
redis.call('PEXPIREAT', KEYS[3], int((day + 2) * DAY_MS))
add_today(KEYS[1], day, tonumber(ARGV[2]))
add_today(KEYS[2], day, tonumber(ARGV[3]))
return 1
"""

# KEYS: session keys. ARGV: turn. The turn's usage is counted: "counting" becomes "ended".
TURN_COUNTED = r"""
local k = declared_keys()
if redis.call('HGET', k.turns, ARGV[1]) == 'counting' then redis.call('HSET', k.turns, ARGV[1], 'ended') end
return 1
"""

# The append shared by APPEND and APPEND_BATCHES: `count` events whose (seq, turn, payload, terminal)
# start at ARGV[first]. Returns OK last_seq | EMPTY expected | GAP expected got | NOT_FOUND; a refusal
# changes nothing.
_APPEND_EVENTS = r"""
local function append_events(k, sid, now, ttl_ms, grace_ms, lease_ms, max_events, first, count)
  local s = live_session(k, now)
  if s == nil then return {'NOT_FOUND'} end
  local last = tonumber(s.last_seq)
  if count == 0 then return {'EMPTY', int(last + 1)} end
  -- Events the log holds exactly (a retry of an append whose answer was lost) are skipped; one that
  -- differs is left in, to be refused as a gap below.
  local skip = 0
  while skip < count do
    local at = first + skip * 4
    local seq = tonumber(ARGV[at])
    if seq > last or seq ~= tonumber(ARGV[first]) + skip then break end
    local entry = redis.call('XRANGE', k.log, seq .. '-0', seq .. '-0')
    if #entry == 0 then break end
    local f = {}
    for j = 1, #entry[1][2], 2 do f[entry[1][2][j]] = entry[1][2][j + 1] end
    if f.turn ~= ARGV[at + 1] or f.payload ~= ARGV[at + 2] or f.terminal ~= ARGV[at + 3] then break end
    skip = skip + 1
  end
  for i = skip, count - 1 do
    local seq = ARGV[first + i * 4]
    if tonumber(seq) ~= last + 1 + i - skip then return {'GAP', int(last + 1 + i - skip), seq} end
  end
  for i = skip, count - 1 do
    local at = first + i * 4
    redis.call('XADD', k.log, ARGV[at] .. '-0', 'turn', ARGV[at + 1], 'payload', ARGV[at + 2], 'terminal', ARGV[at + 3])
  end
  redis.call('XTRIM', k.log, 'MAXLEN', '~', max_events)
  s.last_seq = int(last + count - skip)
  redis.call('HSET', k.session, 'last_seq', s.last_seq)
  -- Appending is the owner's heartbeat: it keeps both the running turn and the session alive.
  if turn_running(s, now) then redis.call('HSET', k.session, 'lease_ms', int(now + lease_ms)) end
  touch(k, sid, s, now, ttl_ms, grace_ms)
  return {'OK', s.last_seq}
end
"""

# KEYS: session keys. ARGV: sid, ttl_ms, grace_ms, lease_ms, max_events, then seq, turn, payload, terminal
# per event. Returns what append_events returns.
APPEND = _APPEND_EVENTS + r"""
local FIRST = 6
return append_events(declared_keys(), ARGV[1], now_ms(), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                     ARGV[5], FIRST, (#ARGV - FIRST + 1) / 4)
"""

# KEYS: the session keys of each batch, one session after the other. ARGV: ttl_ms, grace_ms, lease_ms,
# max_events, then per batch: sid, count, and seq, turn, payload, terminal per event. Returns, per batch,
# what append_events returns: several sessions' appends in one round trip, each refused or done on its own.
APPEND_BATCHES = _APPEND_EVENTS + r"""
local ttl_ms, grace_ms, lease_ms, max_events = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local now = now_ms()
local replies, at = {}, 5
for batch = 0, #KEYS / SESSION_KEY_COUNT - 1 do
  local sid, count = ARGV[at], tonumber(ARGV[at + 1])
  local k = declared_keys(batch * SESSION_KEY_COUNT)
  table.insert(replies, append_events(k, sid, now, ttl_ms, grace_ms, lease_ms, max_events, at + 2, count))
  at = at + 2 + count * 4
end
return replies
"""

# KEYS: session keys. ARGV: sid, user, after_seq, count, touch ('1' on a reader's first pass), ttl_ms, grace_ms,
# max_events. One consistent snapshot: the next events, whether a turn runs, and the stream's last id to
# block from. Returns OK running lease_left_ms last_id n (seq turn payload terminal)*n | TRIMMED first
# | NOT_FOUND.
READ = r"""
local k = declared_keys()
local sid, user, after_seq, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local s = owned_session(k, user, now)
if s == nil then return {'NOT_FOUND'} end
if ARGV[5] == '1' then touch(k, sid, s, now, tonumber(ARGV[6]), tonumber(ARGV[7])) end
local last_seq = tonumber(s.last_seq)
-- XTRIM ~ keeps at least max_events (whole stream nodes); readers see exactly the newest max_events,
-- like the memory store, whatever the physical trimming left.
local first_kept = math.max(1, last_seq - tonumber(ARGV[8]) + 1)
if after_seq + 1 < first_kept then return {'TRIMMED', int(first_kept)} end

local events, first_seq = {}, nil
local start = int(after_seq + 1) .. '-0'
while true do
  local raw = redis.call('XRANGE', k.log, start, '+', 'COUNT', count)
  for _, entry in ipairs(raw) do
    local seq, sub = string.match(entry[1], '^(%d+)%-(%d+)$')
    if sub == '0' then
      local f = {}
      for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
      first_seq = first_seq or tonumber(seq)
      table.insert(events, seq)
      table.insert(events, f.turn)
      table.insert(events, f.payload)
      table.insert(events, f.terminal)
    end
  end
  -- Only control entries in a full page: look further (there is at most one per turn).
  if #events > 0 or #raw < count then break end
  start = '(' .. raw[#raw][1]
end

-- Physically gone although within max_events (it was lowered meanwhile): still never skip silently.
if after_seq < last_seq and first_seq ~= after_seq + 1 then
  return {'TRIMMED', int(first_seq or last_seq + 1)}
end
local tail = redis.call('XREVRANGE', k.log, '+', '-', 'COUNT', 1)
local last_id = '0-0'
if #tail > 0 then last_id = tail[1][1] end
local running, lease_left = '0', '0'
if turn_running(s, now) then
  running, lease_left = '1', int(tonumber(s.lease_ms) - now)
end
local reply = {'OK', running, lease_left, last_id, int(#events / 4)}
for _, value in ipairs(events) do table.insert(reply, value) end
return reply
"""

# KEYS: (expiries, ended) of one or more shards. ARGV: prefix, limit, record. Claims at most `limit` expired
# sessions in all. Returns how many sessions this call claimed.
SWEEP_EXPIRED = r"""
local prefix, limit, record = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local claimed = 0
for shard = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[shard], '-inf', now, 'LIMIT', 0, limit - claimed)
  for _, sid in ipairs(due) do
    -- ZREM answers 1 to exactly one claimant, however many replicas sweep at once.
    if redis.call('ZREM', KEYS[shard], sid) == 1 then
      local k = keys_of(prefix, sid)
      local s = load_hash(k.session)
      if s ~= nil then
        end_session(k, sid, s, tonumber(s.expires_ms), now, record)
        claimed = claimed + 1
      end
    end
  end
  if claimed >= limit then break end
end
return claimed
"""

# KEYS: ended of one or more shards. ARGV: prefix, limit, lease_ms. Claims at most `limit` due end records
# for lease_ms (another replica takes over a record whose claimant died). Returns (sid user conv created_ms
# ended_ms attempts)*.
CLAIM_ENDED = r"""
local prefix, limit, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local claimed, count = {}, 0
for _, ended in ipairs(KEYS) do
  if count >= limit then break end
  local due = redis.call('ZRANGEBYSCORE', ended, '-inf', now, 'LIMIT', 0, limit - count)
  for _, sid in ipairs(due) do
    local key = keys_of(prefix, sid).ended_record
    local r = load_hash(key)
    if r == nil then
      redis.call('ZREM', ended, sid)
    else
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('ZADD', ended, now + lease_ms, sid)
      for _, value in ipairs({sid, r.user, r.conv, r.created_ms, r.ended_ms, int(attempts)}) do
        table.insert(claimed, value)
      end
      count = count + 1
    end
  end
end
return claimed
"""

# KEYS: the session's shard's ended, its end record. ARGV: sid. The record was delivered: forget it.
ACK_ENDED = r"""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: the session's shard's ended. ARGV: sid, delay_ms. XX: a record another replica delivered meanwhile
# stays delivered.
RETRY_ENDED = r"""
redis.call('ZADD', KEYS[1], 'XX', now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: ended of one or more shards. Returns ms until the next end record is due, or -1 when none waits.
NEXT_ENDED_DUE = r"""
local next_due = nil
for _, ended in ipairs(KEYS) do
  local first = redis.call('ZRANGE', ended, 0, 0, 'WITHSCORES')
  if #first > 0 and (next_due == nil or tonumber(first[2]) < next_due) then next_due = tonumber(first[2]) end
end
if next_due == nil then return -1 end
return math.max(0, next_due - now_ms())
"""
