"""The Lua scripts that make the Redis store's multi-key transitions atomic.

Redis runs a script without interleaving any other command, so each one is a
transition of :mod:`enclavefl.cluster.store`: it reads what it checks and writes
what it changes in one step. Every script answers a list whose first element is
``ok``, ``conflict`` (a message follows), ``duplicate`` (a message, then the
refused ids), ``lease`` (a message) or ``held`` (token and holder of a lease).

Keys the caller can name are passed in ``KEYS``. The partial and model keys a
script deletes are built from prefixes in ``ARGV``: every key of a job shares
the ``{job}`` hash tag, so they live in one Redis Cluster slot.

The round-phase table below repeats :data:`enclavefl.cluster.store.ROUND_TRANSITIONS`;
the conformance tests run both stores through it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ACCEPT", "ACQUIRE_LEASE", "COUNT", "FINISH_ROUND", "GET_MODEL", "LIVE_MEMBERS", "MOVE_ROUND", "OPEN_ROUND",
           "PUBLISH_MODEL", "RELEASE_LEASE", "RENEW_LEASE"]

# Refuses unless the lease KEYS[1] holds "token:holder" (ARGV[1], ARGV[2]); an empty token skips the check.
_FENCE: Final = """
local function fence_refusal()
  if ARGV[1] == '' then return nil end
  local held = redis.call('GET', KEYS[1])
  if held == ARGV[1] .. ':' .. ARGV[2] then return nil end
  if not held then
    return {'lease', 'lease token ' .. ARGV[1] .. ' of ' .. ARGV[2] .. ' is no longer held (expired)'}
  end
  return {'lease', 'lease token ' .. ARGV[1] .. ' of ' .. ARGV[2] .. ' is no longer held; now held as ' .. held}
end
local refused = fence_refusal()
if refused then return refused end
"""

_TRANSITIONS: Final = """
local allowed = {open = {closing = true, failed = true}, closing = {closed = true, failed = true},
                 failed = {open = true}, closed = {}}
local function transition_refusal(n, from, to)
  if allowed[from] and allowed[from][to] then return nil end
  return {'conflict', 'round ' .. n .. ': transition ' .. tostring(from) .. ' -> ' .. to .. ' is not allowed'}
end
local function drop_partials(set_key, prefix)
  for _, server in ipairs(redis.call('SMEMBERS', set_key)) do
    redis.call('DEL', prefix .. server)
  end
  redis.call('DEL', set_key)
end
"""

# Checks that round ARGV[3] attempt ARGV[4] is the current round attempt (KEYS[2] current, KEYS[3] its hash);
# leaves its phase in `phase`.
_CURRENT_ATTEMPT: Final = """
local n, a = tonumber(ARGV[3]), tonumber(ARGV[4])
local current = redis.call('GET', KEYS[2])
local st = redis.call('HMGET', KEYS[3], 'attempt', 'phase', 'model_version')
if not current or tonumber(current) ~= n or tonumber(st[1]) ~= a then
  return {'conflict', 'round ' .. n .. ' attempt ' .. a .. ' is not the current round attempt (current round '
          .. tostring(current) .. ', attempt ' .. tostring(st[1]) .. ')'}
end
local phase = st[2]
"""

OPEN_ROUND: Final = _FENCE + _TRANSITIONS + """
-- KEYS: lease, round:current, model:version, round:n, round:(n-1)
-- ARGV: token, holder, n, attempt, model_version, sampled (JSON), required
local n, a = tonumber(ARGV[3]), tonumber(ARGV[4])
local version = redis.call('GET', KEYS[3])
if not version then return {'conflict', 'round ' .. n .. ' cannot open: no model version is published'} end
if version ~= ARGV[5] then
  return {'conflict', 'round ' .. n .. ' would train on model version ' .. ARGV[5] .. ', the current version is '
          .. version}
end
local current = redis.call('GET', KEYS[2])
if current then
  current = tonumber(current)
  if current == n then
    local st = redis.call('HMGET', KEYS[4], 'attempt', 'phase', 'model_version')
    if tonumber(st[1]) == a and st[2] == 'open' and st[3] == ARGV[5] then return {'ok'} end
    local bad = transition_refusal(n, st[2], 'open')
    if bad then return bad end
    if a ~= tonumber(st[1]) + 1 then
      return {'conflict', 'round ' .. n .. ': attempt ' .. a .. ' cannot follow failed attempt ' .. st[1]
              .. ' (expected ' .. (tonumber(st[1]) + 1) .. ')'}
    end
  elseif current == n - 1 then
    local phase = redis.call('HGET', KEYS[5], 'phase')
    if phase ~= 'closed' then
      return {'conflict', 'round ' .. n .. ' cannot open: round ' .. current .. ' is ' .. tostring(phase)
              .. ', not closed'}
    end
  else
    return {'conflict', 'round ' .. n .. ' cannot open: the current round is ' .. current}
  end
end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'number', n, 'attempt', a, 'phase', 'open', 'model_version', ARGV[5],
           'sampled', ARGV[6], 'required', ARGV[7], 'reason', '', 'c:accepted', 0)
redis.call('SET', KEYS[2], n)
return {'ok'}
"""

MOVE_ROUND: Final = _FENCE + _TRANSITIONS + _CURRENT_ATTEMPT + """
-- KEYS: lease, round:current, round:n, round:n:a:partials
-- ARGV: token, holder, n, attempt, to ('closing' or 'failed'), reason, partial key prefix
local to = ARGV[5]
if phase == to then return {'ok'} end
local bad = transition_refusal(n, phase, to)
if bad then return bad end
redis.call('HSET', KEYS[3], 'phase', to, 'reason', ARGV[6])
if to == 'failed' then drop_partials(KEYS[4], ARGV[7]) end
return {'ok'}
"""

FINISH_ROUND: Final = _FENCE + _TRANSITIONS + _CURRENT_ATTEMPT + """
-- KEYS: lease, round:current, round:n, round:n:a:partials, model:version, strategy
-- ARGV: token, holder, n, attempt, model, has strategy ('1'/'0'), strategy, partial key prefix, model key prefix
local trained = tonumber(st[3])
local version = trained + 1
local published = redis.call('GET', KEYS[5])
if phase == 'closed' and published == tostring(version)
   and redis.call('GET', ARGV[9] .. version) == ARGV[5] then
  return {'ok'}
end
local bad = transition_refusal(n, phase, 'closed')
if bad then return bad end
if published ~= tostring(trained) then
  return {'conflict', 'round ' .. n .. ' trained on model version ' .. trained .. ', but the current version is '
          .. tostring(published) .. ': version ' .. version .. ' is not published twice'}
end
redis.call('SET', ARGV[9] .. version, ARGV[5])
redis.call('DEL', ARGV[9] .. (version - 2))
redis.call('SET', KEYS[5], version)
if ARGV[6] == '1' then redis.call('HSET', KEYS[6], 'version', version, 'blob', ARGV[7]) end
redis.call('HSET', KEYS[3], 'phase', 'closed')
drop_partials(KEYS[4], ARGV[8])
return {'ok'}
"""

PUBLISH_MODEL: Final = _FENCE + """
-- KEYS: lease, model:version, strategy, round:current
-- ARGV: token, holder, version, model, has strategy ('1'/'0'), strategy, model key prefix, round key prefix
local version = tonumber(ARGV[3])
local published = redis.call('GET', KEYS[2])
if published and tonumber(published) == version and redis.call('GET', ARGV[7] .. version) == ARGV[4] then
  return {'ok'}
end
if published and version ~= tonumber(published) + 1 then
  return {'conflict', 'model version ' .. version .. ' cannot follow the current version ' .. published
          .. ' (expected ' .. (tonumber(published) + 1) .. ')'}
end
local current = redis.call('GET', KEYS[4])
if current then
  local phase = redis.call('HGET', ARGV[8] .. current, 'phase')
  if phase == 'open' or phase == 'closing' then
    return {'conflict', 'model version ' .. version .. ' not published: round ' .. current .. ' is ' .. phase
            .. ' (its close publishes the next version)'}
  end
end
redis.call('SET', ARGV[7] .. version, ARGV[4])
redis.call('DEL', ARGV[7] .. (version - 2))
redis.call('SET', KEYS[2], version)
if ARGV[5] == '1' then redis.call('HSET', KEYS[3], 'version', version, 'blob', ARGV[6]) end
return {'ok'}
"""

GET_MODEL: Final = """
-- KEYS: model:version; ARGV: model key prefix, wanted version ('' for the current)
local version = ARGV[2]
if version == '' then version = redis.call('GET', KEYS[1]) end
if not version then return {'ok'} end
local blob = redis.call('GET', ARGV[1] .. version)
if not blob then return {'ok'} end
return {'ok', version, blob}
"""

COUNT: Final = """
-- KEYS: round:current, round:n
-- ARGV: n, attempt, counter name/amount pairs...
local current = redis.call('GET', KEYS[1])
local st = redis.call('HMGET', KEYS[2], 'attempt', 'phase')
if not current or tonumber(current) ~= tonumber(ARGV[1]) or tonumber(st[1]) ~= tonumber(ARGV[2])
    or (st[2] ~= 'open' and st[2] ~= 'closing') then
  return {'ok', 0}
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], 'c:' .. ARGV[i], tonumber(ARGV[i + 1]))
end
return {'ok', 1}
"""

ACCEPT: Final = """
-- KEYS: round:current, round:n, accepted, workers, partial:server, partials
-- ARGV: n, attempt, server, generation, partial, #counters, counter name/amount pairs..., worker/id pairs...
local n, a, server, gen = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local ncounts = tonumber(ARGV[6])
local first = 7 + 2 * ncounts
local current = redis.call('GET', KEYS[1])
local st = redis.call('HMGET', KEYS[2], 'attempt', 'phase')
if not current or tonumber(current) ~= n or tonumber(st[1]) ~= a then
  return {'conflict', 'round ' .. n .. ' attempt ' .. a .. ' is not the current round attempt (current round '
          .. tostring(current) .. ', attempt ' .. tostring(st[1]) .. ')'}
end
local held = tonumber(redis.call('HGET', KEYS[5], 'gen') or '0')
if held == gen + 1 and redis.call('HGET', KEYS[5], 'blob') == ARGV[5] then
  local same = true
  for i = first, #ARGV, 2 do
    local rec = redis.call('HGET', KEYS[3], ARGV[i + 1])
    if not rec then same = false; break end
    rec = cjson.decode(rec)
    if rec.server ~= server or rec.worker ~= ARGV[i] then same = false; break end
  end
  if same then return {'ok', tostring(held)} end
end
if st[2] ~= 'open' then
  return {'conflict', 'round ' .. n .. ' attempt ' .. a .. ' is ' .. tostring(st[2]) .. ': no update is accepted'}
end
if held ~= gen then
  return {'conflict', 'round ' .. n .. ' attempt ' .. a .. ': the partial of server ' .. server
          .. ' is at generation ' .. held .. ', the write replaces ' .. gen .. ' (another writer?)'}
end
local refused, seen = {}, {}
for i = first, #ARGV, 2 do
  local worker, id = ARGV[i], ARGV[i + 1]
  local other = redis.call('HGET', KEYS[4], worker)
  if seen[id] or redis.call('HEXISTS', KEYS[3], id) == 1 or (other and other ~= id) then
    table.insert(refused, id)
  end
  seen[id] = true
end
if #refused > 0 then
  table.sort(refused)
  local reply = {'duplicate', 'round ' .. n .. ' attempt ' .. a .. ': updates ' .. table.concat(refused, ', ')
                 .. ' were accepted before (or their worker has another accepted update); nothing recorded'}
  for _, id in ipairs(refused) do table.insert(reply, id) end
  return reply
end
local ids = cjson.decode(redis.call('HGET', KEYS[5], 'ids') or '[]')
local count = 0
for i = first, #ARGV, 2 do
  local worker, id = ARGV[i], ARGV[i + 1]
  redis.call('HSET', KEYS[3], id, cjson.encode({worker = worker, server = server}))
  redis.call('HSET', KEYS[4], worker, id)
  table.insert(ids, id)
  count = count + 1
end
table.sort(ids)
local encoded = '[]'
if #ids > 0 then encoded = cjson.encode(ids) end
redis.call('HSET', KEYS[5], 'gen', gen + 1, 'ids', encoded, 'blob', ARGV[5])
redis.call('SADD', KEYS[6], server)
redis.call('HINCRBY', KEYS[2], 'c:accepted', count)
for i = 7, first - 1, 2 do redis.call('HINCRBY', KEYS[2], 'c:' .. ARGV[i], ARGV[i + 1]) end
return {'ok', tostring(gen + 1)}
"""

LIVE_MEMBERS: Final = """
-- KEYS: members (the index); ARGV: member key prefix
-- The bodies of the live members; expired ones leave the index in the same step (a member registering
-- meanwhile cannot be pruned by mistake).
local reply = {'ok'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local body = redis.call('GET', ARGV[1] .. id)
  if body then table.insert(reply, body) else redis.call('SREM', KEYS[1], id) end
end
return reply
"""

ACQUIRE_LEASE: Final = """
-- KEYS: lease, its fencing counter; ARGV: holder, ttl (ms)
local held = redis.call('GET', KEYS[1])
if held then
  local token, holder = string.match(held, '^(%d+):(.*)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {'ok', token}
  end
  return {'held', token, holder}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ':' .. ARGV[1], 'NX', 'PX', ARGV[2])
return {'ok', tostring(token)}
"""

RENEW_LEASE: Final = """
-- KEYS: lease; ARGV: token, holder, ttl (ms)
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] .. ':' .. ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'ok'}
end
return {'lease', 'lease token ' .. ARGV[1] .. ' of ' .. ARGV[2] .. ' is no longer held; now held as ' .. tostring(held)}
"""

RELEASE_LEASE: Final = """
-- KEYS: lease; ARGV: token, holder
if redis.call('GET', KEYS[1]) == ARGV[1] .. ':' .. ARGV[2] then redis.call('DEL', KEYS[1]) end
return {'ok'}
"""
