-- One pool of concurrency slots and its fair wait queue, every operation one atomic call.
-- One file for all operations so the sweep and the fair dispatch exist once.
--
-- Pool operations (admit, poll, cancel, release, stats):
-- KEYS 1 sem   ZSET lease id -> deadline (ms, Redis TIME)
--      2 lmeta HASH lease id -> account
--      3 q     ZSET, every score 0, member "<acct>:<seq 16 digits>:<ticket>" (lex order =
--              FIFO per account)
--      4 qlive ZSET ticket -> liveness deadline (a waiter whose worker stops polling goes)
--      5 qmeta HASH ticket -> "<acct>:<seq>:<tokens>"
--      6 ready ZSET "<head seq>:<acct>" -> when the account was last granted a slot (0:
--              not lately), one member per waiting account: the least recently served
--              goes next (ties: oldest head), i.e. round robin between accounts
--      7 st    HASH seq, d (grants so far), qn (waiters), qtok (tokens waiting), hold (mean
--              hold ms), ep (epoch, below), and per account: h:<acct> held, l:<acct> last
--              grant (while it holds or waits), n:<acct> waiting, t:<acct> tokens waiting,
--              r:<acct> its ready member
-- All keys share the pool's hash tag ({model}). Accounts are fixed-width hex digests.
-- ARGV 1 op, 2 limit, 3 wake channel ('' none), 4 live_ms (waiter liveness, and the window
--      a worker has to claim a slot handed to its waiter), 5 ttl_ms (lease TTL), 6.. per op.
--
-- heartbeat: KEYS 1 workers ZSET (worker -> deadline), then sem, lmeta, st of each of one
--      model's pools; ARGV 1 'heartbeat', 2 worker id, 3 ttl_ms, 4 worker_ttl_ms, then for
--      each pool the epoch this worker saw last ('' none), a count n and n pairs lease id,
--      account. Renews the leases; answers {live workers, then per pool: epoch, n restored,
--      restored ids..., n lost, lost ids...}.
--
-- Epoch: st's field ep, set from TIME by whichever call first finds it missing. It only
-- goes missing (or changes) when the pool's data was lost (a flush, a restart without
-- persistence, a failover to an empty replica); the heartbeat then re-grants the leases
-- the worker still holds, so the pool counts the requests still in flight again.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local epoch_now = t[1] .. '.' .. t[2]
local SEM, LMETA, Q, QLIVE, QMETA, READY, ST
local limit, chan, live_ms, ttl
local qn, hold_v, ep, used = 0, '', ''

if op ~= 'heartbeat' then
  SEM, LMETA, Q, QLIVE, QMETA, READY, ST = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
  limit, chan, live_ms, ttl = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  -- Read once and kept in step with this call's writes (scripts are atomic): the number
  -- of waiters, the mean hold time and (when first needed) the number of leases. Every
  -- waiter is in q, qlive and qmeta, and its account has a ready member, so with qn = 0
  -- those need no reading at all.
  local st = redis.call('HMGET', ST, 'qn', 'hold', 'ep')
  qn = tonumber(st[1] or '0')
  hold_v = st[2] or ''
  ep = st[3]
  if not ep then
    ep = epoch_now
    redis.call('HSET', ST, 'ep', ep)
  end
end

local function count()
  if not used then used = redis.call('ZCARD', SEM) end
  return used
end

local function head_of(acct)
  return redis.call('ZRANGEBYLEX', Q, '[' .. acct .. ':', '(' .. acct .. ';', 'LIMIT', 0, 1)[1]
end

-- Write st fields: a positive value is set, anything else deleted (st keeps no zeros).
local function store(fields)
  local sets, dels = {}, {}
  for i = 1, #fields, 2 do
    local v = fields[i + 1]
    if type(v) == 'string' or v > 0 then
      sets[#sets + 1] = fields[i]; sets[#sets + 1] = v
    else
      dels[#dels + 1] = fields[i]
    end
  end
  if #sets > 0 then redis.call('HSET', ST, unpack(sets)) end
  if #dels > 0 then redis.call('HDEL', ST, unpack(dels)) end
end

local function add_held(acct, d)
  local field = 'h:' .. acct
  local h = redis.call('HINCRBY', ST, field, d)
  if d > 0 then
    if h <= 0 then redis.call('HDEL', ST, field) end
    -- Its READY score (if it waits) follows l:<acct> in dispatch(), which takes the
    -- waiter out of the queue after this and re-reads l:<acct> then.
    redis.call('HSET', ST, 'l:' .. acct, redis.call('HINCRBY', ST, 'd', 1))
  elseif h > 0 then
    return
  elseif qn > 0 and redis.call('HEXISTS', ST, 'r:' .. acct) == 1 then
    redis.call('HDEL', ST, field)  -- still waiting: its last grant still counts
  else
    -- An account neither holding nor waiting is forgotten (st stays as small as the
    -- set of active accounts); it comes back as "not served lately".
    redis.call('HDEL', ST, field, 'l:' .. acct)
  end
end

-- Remove a waiter, and put its account in READY under its next head (or take it out);
-- true if it was queued. Its account's st fields are read once and written once.
local function unqueue(ticket)
  if qn == 0 then return false end
  local meta = redis.call('HGET', QMETA, ticket)
  if not meta then return false end
  local acct, seq, tok = string.match(meta, '^(%x+):(%d+):(%d+)$')
  tok = tonumber(tok)
  redis.call('ZREM', Q, acct .. ':' .. seq .. ':' .. ticket)
  redis.call('ZREM', QLIVE, ticket)
  redis.call('HDEL', QMETA, ticket)
  local f = redis.call('HMGET', ST, 'qtok', 'n:' .. acct, 't:' .. acct, 'r:' .. acct,
    'l:' .. acct, 'h:' .. acct)
  qn = math.max(qn - 1, 0)
  local left = tonumber(f[2] or '0') - 1
  local fields = {'qn', qn, 'qtok', tonumber(f[1] or '0') - tok, 'n:' .. acct, left,
    't:' .. acct, tonumber(f[3] or '0') - tok}
  local old = f[4]
  if old then redis.call('ZREM', READY, old) end
  -- n:<acct> counts its waiters: with none left there is no head to look for.
  local head = left > 0 and head_of(acct)
  if head then
    local member = string.sub(head, #acct + 2, #acct + 17) .. ':' .. acct
    redis.call('ZADD', READY, tonumber(f[5] or '0'), member)
    fields[#fields + 1] = 'r:' .. acct; fields[#fields + 1] = member
  elseif old then
    fields[#fields + 1] = 'r:' .. acct; fields[#fields + 1] = 0
    if tonumber(f[6] or '0') == 0 then
      fields[#fields + 1] = 'l:' .. acct; fields[#fields + 1] = 0
    end
  end
  store(fields)
  return true
end

local function drop_lease(id)
  if redis.call('ZREM', SEM, id) == 0 then return false end
  if used then used = used - 1 end
  local acct = redis.call('HGET', LMETA, id)
  redis.call('HDEL', LMETA, id)
  if acct then add_held(acct, -1) end
  return true
end

local function grant(id, acct, deadline)
  local added = redis.call('ZADD', SEM, deadline, id)
  if used then used = used + added end
  redis.call('HSET', LMETA, id, acct)
  add_held(acct, 1)
end

-- Bounded sweeps: a mass crash never makes one call slow (scripts block the server).
local function sweep()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', SEM, '-inf', now, 'LIMIT', 0, 64)) do
    drop_lease(id)
  end
  if qn == 0 then return end
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', QLIVE, '-inf', now, 'LIMIT', 0, 64)) do
    unqueue(w)
  end
end

-- Hand every free slot to the next waiter in fair order, and tell their workers.
-- The handed-over lease lives only live_ms until its worker claims it.
local function dispatch()
  if qn == 0 then return end
  local free = limit - count()
  local woken = {}
  while free > 0 and qn > 0 do
    local top = redis.call('ZRANGE', READY, 0, 0)[1]
    if not top then break end
    local acct = string.sub(top, 18)
    local head = head_of(acct)
    local ticket = string.sub(head, #acct + 19)
    -- Granted first, so that unqueue() files the account under its next head with
    -- this grant as its last.
    grant(ticket, acct, now + live_ms)
    unqueue(ticket)
    free = free - 1
    woken[#woken + 1] = ticket
  end
  if #woken > 0 and chan ~= '' then
    redis.call('PUBLISH', chan, table.concat(woken, ' '))
  end
end

local function remaining()
  return math.max(0, limit - count())
end

if op == 'heartbeat' then
  ttl = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local out = {redis.call('ZCARD', KEYS[1])}
  local a = 5
  for k = 2, #KEYS, 3 do
    SEM, LMETA, ST = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    local seen, n = ARGV[a], tonumber(ARGV[a + 1])
    a = a + 2
    local ep = redis.call('HGET', ST, 'ep')
    -- Missing, or not the one this worker saw: the pool's data was lost since. A worker
    -- that never saw one ('') cannot tell, unless it is missing.
    local reset = not ep or (seen ~= '' and seen ~= ep)
    if not ep then
      ep = epoch_now
      redis.call('HSET', ST, 'ep', ep)
    end
    local restored, lost = {}, {}
    for i = a, a + 2 * n - 1, 2 do
      local id = ARGV[i]
      -- A lease still in the set is still counted, so renewing it (even past its
      -- deadline, before a sweep) cannot over-admit. Without data loss a swept one is
      -- lost for good (re-adding it could race its release); after a loss the worker
      -- still holds it, so it is granted again (a release racing this: see redis.py).
      if redis.call('ZADD', SEM, 'XX', 'CH', now + ttl, id) == 0
          and not redis.call('ZSCORE', SEM, id) then
        if reset then
          grant(id, ARGV[i + 1], now + ttl)
          restored[#restored + 1] = id
        else
          lost[#lost + 1] = id
        end
      end
    end
    a = a + 2 * n
    out[#out + 1] = ep
    out[#out + 1] = #restored
    for _, id in ipairs(restored) do out[#out + 1] = id end
    out[#out + 1] = #lost
    for _, id in ipairs(lost) do out[#out + 1] = id end
  end
  return out
end

sweep()
dispatch()

if op == 'admit' then
  -- Granted or queued, the reply ends with the pool's epoch: a worker learns it with its
  -- first lease there, before its heartbeat does.
  local ticket, acct, tokens = ARGV[6], ARGV[7], tonumber(ARGV[8])
  local max_q, max_qtok, acct_cap, acct_tok = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
  -- After dispatch() either no slot is free or nobody waits: nobody jumps the queue.
  if qn == 0 and count() < limit then
    -- NX: a retry of an admit that already got its slot only renews it.
    if redis.call('ZADD', SEM, 'NX', now + ttl, ticket) == 0 then
      redis.call('ZADD', SEM, 'XX', now + ttl, ticket)
      return {1, remaining(), ep}
    end
    used = used + 1
    redis.call('HSET', LMETA, ticket, acct)
    add_held(acct, 1)
    return {1, remaining(), ep}
  end
  if redis.call('ZSCORE', SEM, ticket) then                       -- idempotent retry
    redis.call('ZADD', SEM, 'XX', now + ttl, ticket)
    return {1, remaining(), ep}
  end
  if qn > 0 and redis.call('HEXISTS', QMETA, ticket) == 1 then return {2, qn, hold_v, ep} end
  local q = redis.call('HMGET', ST, 'qtok', 'n:' .. acct, 't:' .. acct, 'seq', 'l:' .. acct)
  local qtok, acct_n, acct_t = tonumber(q[1] or '0'), tonumber(q[2] or '0'), tonumber(q[3] or '0')
  local reason
  if qn >= max_q then reason = 'queue_full'
  elseif max_qtok >= 0 and qtok + tokens > max_qtok then reason = 'queue_tokens'
  elseif acct_n >= acct_cap then reason = 'account_queue_full'
  elseif acct_tok >= 0 and acct_t + tokens > acct_tok then reason = 'account_queue_tokens'
  end
  if reason then return {0, reason, qn, hold_v} end
  local seqn = tonumber(q[4] or '0') + 1
  local seq = string.format('%016d', seqn)
  redis.call('ZADD', Q, 0, acct .. ':' .. seq .. ':' .. ticket)
  redis.call('ZADD', QLIVE, now + live_ms, ticket)
  redis.call('HSET', QMETA, ticket, acct .. ':' .. seq .. ':' .. tokens)
  qn = qn + 1
  local fields = {'seq', seqn, 'qn', qn, 'qtok', qtok + tokens, 'n:' .. acct, acct_n + 1,
    't:' .. acct, acct_t + tokens}
  -- seq only grows, so an account's first waiter is its head and a later one is not
  -- (its READY member stays as it is).
  if acct_n == 0 then
    local member = seq .. ':' .. acct
    redis.call('ZADD', READY, tonumber(q[5] or '0'), member)
    fields[#fields + 1] = 'r:' .. acct; fields[#fields + 1] = member
  end
  store(fields)
  return {2, qn, hold_v, ep}
end

if op == 'poll' then
  -- For each ticket: 1 granted (claimed: renewed to the full TTL), 2 still waiting
  -- (liveness refreshed), 0 gone (its place lapsed); then the value (free slots or
  -- waiters). The pool's mean hold time comes first.
  local out = {hold_v}
  for i = 6, #ARGV do
    local id = ARGV[i]
    -- XX CH: 1 if it was there (renewed); 0 also if renewed to the same deadline.
    if redis.call('ZADD', SEM, 'XX', 'CH', now + ttl, id) == 1
        or redis.call('ZSCORE', SEM, id) then
      out[#out + 1] = 1; out[#out + 1] = remaining()
    elseif qn > 0 and (redis.call('ZADD', QLIVE, 'XX', 'CH', now + live_ms, id) == 1
        or redis.call('ZSCORE', QLIVE, id)) then
      out[#out + 1] = 2; out[#out + 1] = qn
    else
      out[#out + 1] = 0; out[#out + 1] = 0
    end
  end
  return out
end

if op == 'cancel' then
  -- Leave the queue; if the slot was handed over meanwhile, claim it for the caller.
  local id = ARGV[6]
  if unqueue(id) then return {0, 0} end
  if redis.call('ZSCORE', SEM, id) then
    redis.call('ZADD', SEM, 'XX', now + ttl, id)
    return {1, remaining()}
  end
  return {0, 0}
end

if op == 'release' then
  -- Also drops a place still queued under this id (an abandoned admit).
  local id, held_ms = ARGV[6], tonumber(ARGV[7])
  local removed = drop_lease(id)
  unqueue(id)
  if removed and held_ms >= 0 then
    local old = tonumber(hold_v) or -1
    local mean = held_ms
    if old >= 0 then mean = old * 0.9 + held_ms * 0.1 end
    redis.call('HSET', ST, 'hold', string.format('%.1f', mean))
  end
  dispatch()
  return {removed and 1 or 0}
end

if op == 'stats' then
  return {count(), qn}
end

return redis.error_reply('slots.lua: unknown op ' .. tostring(op))
