"""Lua scripts of the Redis ledger: every state change is one script.

Key layout (``P`` is the run prefix, ``"{namespace}:"``):

=========================  ==========  ============================================
key                        type        content
=========================  ==========  ============================================
``P meta``                 hash        schema, attempt, epoch, seq, verifier,
                                       ``ep:<e>`` (epoch begun), nctr (nonces)
                                       rb (resident bytes, see free_queue.py)
``P s:<sid>``              hash        catalog: g(gen) c(committed) t(tomb)
                                       st(status) ref q(seq) why(reason)
``P stat``                 hash        catalog counts by status, ``c`` = committed
``P live`` / ``P qs``      set         ids with status LIVE / QUARANTINED
``P de:<sid>``             set         epochs holding a delivery of ``sid``
``P d:<e>:<sid>``          hash        delivery: g s(state) o(ord) ow(owner)
                                       n(nonce) dl(deadline) sp(step) sl(slot,
                                       '' outside a plan); ow n dl sl are
                                       meaningful only while LEASED, sp only
                                       in TRAINED/DURABLE (kept, not deleted)
``P n:<e>``                hash        deliveries of epoch ``e`` by state
``P E``                    set         epochs ever holding a delivery
``P p:<e>``                zset        PENDING ids of epoch ``e`` by ord
``P L``                    zset        LEASED ``<e>:<sid>`` by deadline
``P T`` / ``P D``          zset        TRAINED / DURABLE ``<e>:<sid>`` by step
``P plan:<key>``           hash        ns(next step) es(end step)
``P plans``                set         plan keys (dropped by reconcile)
``P cl:<key>``             hash        ``<step>:<rank>`` claims of a plan
``P sl:<slot>``            zset        ids leased to one (plan, step, rank) by ord
``P prod``                 hash        producer -> done (0/1)
``P fq``                   hash        delete queue: ``sid@gen`` -> ref JSON
``P hb``                   hash        producer -> JSON {host, pid, info, ls}
``P r:<token>``            string      reply of a mutating call, for 60 s (retry)
=========================  ==========  ============================================

Every script takes ``ARGV = [P, token, drop, now, ...]``: ``token`` names the
call so a retry after a lost reply gets the first reply back instead of running
twice (``""``: not cached); ``drop`` is the caller's previous token, whose
cached reply is no longer needed; ``now`` is the client's clock or ``""`` for
the server's (``TIME``). Validation happens before the first write, because
Redis does not roll a script back on error; errors are replies
``{"!", kind, sample_id, generation, superseding generation}``. Numbers that must stay exact travel as strings (Lua
``tostring`` keeps only 14 digits).
"""

from __future__ import annotations

from ._redis_requeue import REQUEUE
from .free_queue import REDIS_SCRIPTS as FREEQ_SCRIPTS
from .heartbeats import REDIS_SCRIPTS

__all__ = ["SCRIPTS"]

_PRELUDE = r"""
local P, TOKEN = ARGV[1], ARGV[2]
if ARGV[3] ~= '' and ARGV[3] ~= TOKEN then redis.call('DEL', P..'r:'..ARGV[3]) end
if TOKEN ~= '' then
  local c = redis.call('GET', P..'r:'..TOKEN)
  if c then return cjson.decode(c) end
end
local NOW
if ARGV[4] ~= '' then NOW = tonumber(ARGV[4]) else
  local t = redis.call('TIME'); NOW = tonumber(t[1]) + tonumber(t[2]) / 1e6 end
-- Index writes (ZADD/ZREM/SADD/SREM) are buffered per key, in order, and sent as
-- few variadic calls by apply(): one redis.call costs more than the work it does.
-- Rule: apply() before reading a key that may have buffered writes.
local BUF, BUFK = {}, {}
local function later(cmd, key, score, member)
  local q = BUF[key]
  if not q then q = {}; BUF[key] = q; BUFK[#BUFK + 1] = key end
  q[#q + 1] = cmd; q[#q + 1] = score; q[#q + 1] = member
end
local function zadd(key, score, member) later('ZADD', key, score, member) end
local function zrem(key, member) later('ZREM', key, false, member) end
local function sadd(key, member) later('SADD', key, false, member) end
local function srem(key, member) later('SREM', key, false, member) end
local function send(cmd, key, args)
  for i = 1, #args, 4000 do  -- stay under Lua's unpack limit (4000 is even: ZADD pairs stay whole)
    redis.call(cmd, key, unpack(args, i, math.min(#args, i + 3999)))
  end
end
local function apply()
  for _, key in ipairs(BUFK) do
    local q, cmd, args = BUF[key], nil, {}
    for i = 1, #q, 3 do
      if q[i] ~= cmd then
        if cmd then send(cmd, key, args) end
        cmd, args = q[i], {}
      end
      if cmd == 'ZADD' or cmd == 'HSET' then args[#args + 1] = q[i + 1] end
      args[#args + 1] = q[i + 2]
    end
    if cmd then send(cmd, key, args) end
  end
  BUF, BUFK = {}, {}
end
-- counter deltas, written once per script by flush()
local DELTA = {}
local function cnt(key, field, by)
  local t = DELTA[key]
  if not t then t = {}; DELTA[key] = t end
  t[field] = (t[field] or 0) + by
end
local function flush()
  apply()
  for key, t in pairs(DELTA) do
    for field, by in pairs(t) do if by ~= 0 then redis.call('HINCRBY', key, field, by) end end
  end
  DELTA = {}
end
local function done(reply)
  flush()
  if TOKEN ~= '' then redis.call('SET', P..'r:'..TOKEN, cjson.encode(reply), 'PX', 60000) end
  return reply
end
local function split_on(text, sep)
  local out, i = {}, 1
  if text == '' then return out end
  while true do
    local j = string.find(text, sep, i, true)
    if not j then out[#out + 1] = string.sub(text, i); return out end
    out[#out + 1] = string.sub(text, i, j - 1)
    i = j + 1
  end
end
local function istr(x) return string.format('%d', x) end
-- the durable delete queue (free_queue.py): a ref whose bytes no entry needs, by "sid@gen"
-- (buffered: one variadic HSET per script; ``gen`` given when known saves decoding the ref)
local function queue_free(ref, sid, gen)
  if not gen then
    local r = cjson.decode(ref)
    sid, gen = r.sample_id, string.format('%d', r.generation)
  end
  later('HSET', P..'fq', sid..'@'..gen, ref)
end
-- resident bytes (free_queue.py): meta field rb, kept only once resident_bytes() seeded it
local RB
local function count_committed(ref)
  if RB == nil then RB = redis.call('HEXISTS', P..'meta', 'rb') == 1 end
  if RB then cnt(P..'meta', 'rb', cjson.decode(ref).nbytes) end
end
local function dkey(e, sid) return P..'d:'..e..':'..sid end
local function skey(sid) return P..'s:'..sid end
local function split(m) local i = string.find(m, ':', 1, true); return string.sub(m, 1, i - 1), string.sub(m, i + 1) end
-- A delivery's lease fields (ow n dl sl) and step (sp) are only meaningful in the
-- states that set them (LEASED; TRAINED/DURABLE): every check reads the state too,
-- so leaving a state does not delete them. ``sl`` is '' for a lease outside a plan.
-- remove a delivery from the index of its state ``s``
local function leave(e, sid, s, sl)
  if s == '0' then zrem(P..'p:'..e, sid)
  elseif s == '1' then
    zrem(P..'L', e..':'..sid)
    if sl and sl ~= '' then zrem(P..'sl:'..sl, sid) end
  elseif s == '2' then zrem(P..'T', e..':'..sid)
  else zrem(P..'D', e..':'..sid) end
  cnt(P..'n:'..e, s, -1)
end
local function to_pending(e, sid, ord)
  redis.call('HSET', dkey(e, sid), 's', '0')
  zadd(P..'p:'..e, ord, sid)
  cnt(P..'n:'..e, '0', 1)
end
local function drop_delivery(e, sid, s, sl)
  leave(e, sid, s, sl)
  redis.call('DEL', dkey(e, sid))
  redis.call('SREM', P..'de:'..sid, e)
end
-- LEASED -> PENDING for every lease whose deadline passed
local function reclaim()
  apply()
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', P..'L', '-inf', '('..string.format('%.17g', NOW))) do
    local e, sid = split(m)
    local d = redis.call('HMGET', dkey(e, sid), 'o', 'sl')
    leave(e, sid, '1', d[2])
    to_pending(e, sid, d[1])
  end
  apply()
end
-- status indexes and counts only; the caller writes the ``st`` field
local function restat(sid, old, new)
  if old == new then return end
  if old then
    cnt(P..'stat', old, -1)
    if old == '0' then srem(P..'live', sid) elseif old == '2' then srem(P..'qs', sid) end
  end
  cnt(P..'stat', new, 1)
  if new == '0' then sadd(P..'live', sid) elseif new == '2' then sadd(P..'qs', sid) end
end
local function set_status(sid, old, new)
  restat(sid, old, new)
  redis.call('HSET', skey(sid), 'st', new)
end
-- drop the PENDING and LEASED deliveries of ``sid`` in every epoch
local function drop_undone(sid)
  for _, e in ipairs(redis.call('SMEMBERS', P..'de:'..sid)) do
    local d = redis.call('HMGET', dkey(e, sid), 's', 'sl')
    if d[1] == '0' or d[1] == '1' then drop_delivery(e, sid, d[1], d[2]) end
  end
end
local function closed()
  local v = redis.call('HVALS', P..'prod')
  if #v == 0 then return false end
  for _, x in ipairs(v) do if x ~= '1' then return false end end
  return true
end
-- PENDING (already popped from ``p:<e>``, counted by the caller) -> LEASED;
-- ``ord`` is the popped score, the delivery's place in its slot
local function take_lease(e, sid, owner, nonce, dls, sl, ord)
  redis.call('HSET', dkey(e, sid), 's', '1', 'ow', owner, 'n', nonce, 'dl', dls, 'sl', sl)
  zadd(P..'L', dls, e..':'..sid)
  if sl ~= '' then zadd(P..'sl:'..sl, ord, sid) end
end
local function nonce_base(count)
  return redis.call('HINCRBY', P..'meta', 'nctr', count) - count
end
local function nonce(prefix, base, i) return prefix..string.format('%08x', (base + i) % 4294967296) end
-- TRAINED at <= step -> DURABLE; with free, FREED refs of samples with nothing left to do
local function durable(step, free, retain)
  apply()
  local got = redis.call('ZRANGEBYSCORE', P..'T', '-inf', step, 'WITHSCORES')
  if #got > 0 then redis.call('ZREMRANGEBYSCORE', P..'T', '-inf', step) end
  local sids, now_durable = {}, {}
  for i = 1, #got, 2 do
    local m = got[i]
    local e, sid = split(m)
    redis.call('HSET', dkey(e, sid), 's', '3')
    cnt(P..'n:'..e, '2', -1)
    cnt(P..'n:'..e, '3', 1)
    zadd(P..'D', got[i + 1], m)
    if not now_durable[sid] then now_durable[sid] = {}; sids[#sids + 1] = sid end
    now_durable[sid][e] = true
  end
  -- checkpoint retention (retention.py): free only what the previous mark covers
  local st = tonumber(step)
  local marks, prev, seen = cjson.decode(redis.call('HGET', P..'meta', 'marks') or '[]'), nil, false
  for _, m in ipairs(marks) do
    if m < st and (not prev or m > prev) then prev = m end
    if m == st then seen = true end
  end
  if not seen then
    marks[#marks + 1] = st; table.sort(marks)
    while #marks > 32 do table.remove(marks, 1) end
  end
  redis.call('HSET', P..'meta', 'marks', cjson.encode(marks))
  local upto = prev
  if not retain then upto = st end
  local freed = {}
  local hz = redis.call('HGET', P..'meta', 'hz')
  if free and upto and (not hz or upto > tonumber(hz)) then
    apply()
    local lo = '-inf'
    if hz then lo = '('..hz end
    redis.call('HSET', P..'meta', 'hz', istr(upto))
    local tried = {}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', P..'D', lo, istr(upto))) do
      local me, sid = split(m)
      if not tried[sid] then
        tried[sid] = true
        local undone = false
        for _, e in ipairs(redis.call('SMEMBERS', P..'de:'..sid)) do
          -- this member's own delivery is DURABLE (it is in the D index): only the others are read
          if e ~= me and redis.call('HGET', dkey(e, sid), 's') ~= '3' then undone = true; break end
        end
        if not undone then
          local s = redis.call('HMGET', skey(sid), 'st', 'ref', 'c')
          if s[1] == '0' then freed[#freed + 1] = s[2]; set_status(sid, '0', '3'); queue_free(s[2], sid, s[3]) end
        end
      end
    end
  end
  return #sids, freed
end
-- sessions and fences (fencing.py): the live session record, or nil
local function sess_live(me, dead)
  local s = redis.call('HMGET', P..'meta', 'sess', 'sbeat', 'attempt')
  if not s[1] or s[1] == '' then return nil end
  local rec = cjson.decode(s[1])
  if rec.me == me or (dead ~= '' and tonumber(dead) == rec.fence) then return nil end
  if rec.fence ~= tonumber(s[3]) or not s[2] or NOW - tonumber(s[2]) > rec.ttl then return nil end
  return s[1], s[2]
end
-- nil, or the error reply of a stale fence / a fence-less call during another's live session
local function gate(fence, me)
  if fence ~= '' then
    local a = redis.call('HGET', P..'meta', 'attempt')
    if fence ~= a then return {'!fenced', a, redis.call('HGET', P..'meta', 'sess') or ''} end
    return nil
  end
  local rec, beat = sess_live(me, '')
  if rec then return {'!session', rec, beat, string.format('%.6f', NOW)} end
  return nil
end
"""

_INIT = r"""
local P = ARGV[1]
local m = P..'meta'
if redis.call('EXISTS', m) == 0 then
  redis.call('HSET', m, 'schema', ARGV[2], 'attempt', '0', 'epoch', '0', 'seq', '0', 'nctr', '0')
  if ARGV[3] ~= '' then redis.call('HSET', m, 'verifier', ARGV[3]) end
end
return redis.call('HMGET', m, 'schema', 'verifier')
"""

_RESERVE = r"""
local out = {}
for i = 5, #ARGV do
  local sid = ARGV[i]
  local k = skey(sid)
  if redis.call('HSETNX', k, 'st', '-1') == 1 then
    redis.call('HSET', k, 'g', '1', 'c', '0', 't', '0')
    cnt(P..'stat', '-1', 1)
    out[#out + 1] = '1'
  else
    out[#out + 1] = istr(redis.call('HINCRBY', k, 'g', 1))
  end
end
return done(out)
"""

# ARGV[5]: lines "sid\tgeneration\tref json"; ARGV[6]: '1' for if_absent (first commit wins), whose
# reply is {'ok', superseded refs, refused lines "sid\tgeneration\tcommitted ref json"}
_COMMIT = r"""
local ABSENT = ARGV[6] == '1'
local todo, refused = {}, {}
for _, line in ipairs(split_on(ARGV[5], '\n')) do
  local f = split_on(line, '\t')
  local sid, gen = f[1], tonumber(f[2])
  local r = redis.call('HMGET', skey(sid), 'st', 'g', 'c', 't', 'ref', 'why')
  if not r[1] or gen > tonumber(r[2]) then
    return {'!', 'unreserved', sid, istr(gen), ''}
  end
  local g, c, t = tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
  if gen <= t then return {'!', 'aborted', sid, istr(gen), ''} end
  if gen ~= c then
    if ABSENT and c > 0 and r[1] ~= '1' then
      -- first commit wins: the id's committed generation and state stay as they are
      refused[#refused + 1] = sid..'\t'..f[2]..'\t'..(r[5] or '')
    else
      if (gen < g and not ABSENT) or gen < c then
        return {'!', 'stale', sid, istr(gen), istr(math.max(g, c))}
      end
      todo[#todo + 1] = {sid, f[2], f[3], r[1], c, r[5], r[6]}
    end
  end
end
local function reply(sup)
  if ABSENT then return done({'ok', sup, table.concat(refused, '\n')}) end
  return done(sup)
end
if #todo == 0 then return reply('') end
local epoch = redis.call('HGET', P..'meta', 'epoch')
local seq = tonumber(redis.call('HGET', P..'meta', 'seq'))
local superseded, fresh = {}, false
for _, x in ipairs(todo) do
  local sid, gen, ref, st, c, old, why = x[1], x[2], x[3], x[4], x[5], x[6], x[7]
  if c > 0 and old and (st == '0' or st == '2') then superseded[#superseded + 1] = old; queue_free(old) end
  seq = seq + 1
  local q = istr(seq)
  redis.call('HSET', skey(sid), 'c', gen, 'ref', ref, 'q', q, 'st', '0')
  count_committed(ref)
  if why then redis.call('HDEL', skey(sid), 'why') end
  restat(sid, st, '0')
  local had = false  -- a never-committed id has no delivery anywhere
  if c == 0 then cnt(P..'stat', 'c', 1) else
    -- the new generation takes over undone deliveries in every epoch (old leases are lost)
    for _, e in ipairs(redis.call('SMEMBERS', P..'de:'..sid)) do
      local d = redis.call('HMGET', dkey(e, sid), 's', 'sl', 'o')
      if d[1] == '0' or d[1] == '1' then
        redis.call('HSET', dkey(e, sid), 'g', gen)
        if d[1] == '1' then leave(e, sid, '1', d[2]); to_pending(e, sid, d[3]) end
      end
      if e == epoch then had = true end
    end
  end
  -- the current epoch's delivery is PENDING at the new commit's place in the order
  if had then
    local d = redis.call('HMGET', dkey(epoch, sid), 's', 'sl')
    leave(epoch, sid, d[1], d[2])
  else
    redis.call('SADD', P..'de:'..sid, epoch)
    fresh = true
  end
  redis.call('HSET', dkey(epoch, sid), 'g', gen, 'o', q, 's', '0')
  zadd(P..'p:'..epoch, q, sid)
  cnt(P..'n:'..epoch, '0', 1)
end
if fresh then redis.call('SADD', P..'E', epoch) end
redis.call('HSET', P..'meta', 'seq', istr(seq))
return reply(table.concat(superseded, '\n'))
"""

# ARGV[5]=epoch ARGV[6]=tag ARGV[7]=shuffle ARGV[8..]: pairs (sid, ord) for a shuffle
_BEGIN_EPOCH = r"""
local e = ARGV[5]
if redis.call('HEXISTS', P..'meta', 'ep:'..e) == 1 then return {'done'} end
local fresh = {}
for _, sid in ipairs(redis.call('SMEMBERS', P..'live')) do
  if redis.call('EXISTS', dkey(e, sid)) == 0 then fresh[#fresh + 1] = sid end
end
local ords = {}
if ARGV[7] == '1' then
  for i = 8, #ARGV, 2 do ords[ARGV[i]] = ARGV[i + 1] end
  local missing = {}
  for _, sid in ipairs(fresh) do if not ords[sid] then missing[#missing + 1] = sid end end
  for _, sid in ipairs(redis.call('ZRANGE', P..'p:'..e, 0, -1)) do
    if not ords[sid] then missing[#missing + 1] = sid end
  end
  if #missing > 0 then return {'missing', missing} end
end
for _, sid in ipairs(fresh) do
  local s = redis.call('HMGET', skey(sid), 'c', 'q')
  redis.call('HSET', dkey(e, sid), 'g', s[1], 'o', s[2], 's', '0')
  zadd(P..'p:'..e, s[2], sid)
  cnt(P..'n:'..e, '0', 1)
  redis.call('SADD', P..'de:'..sid, e)
end
if #fresh > 0 then redis.call('SADD', P..'E', e) end
apply()
for _, sid in ipairs(redis.call('ZRANGE', P..'p:'..e, 0, -1)) do
  -- shuffled: the seeded order; not: commit order, also for what an earlier, shuffled run ordered
  local o = ords[sid]
  if ARGV[7] ~= '1' then o = redis.call('HGET', skey(sid), 'q') end
  redis.call('HSET', dkey(e, sid), 'o', o)
  zadd(P..'p:'..e, o, sid)
end
redis.call('HSET', P..'meta', 'ep:'..e, ARGV[6])
if tonumber(e) > tonumber(redis.call('HGET', P..'meta', 'epoch')) then redis.call('HSET', P..'meta', 'epoch', e) end
flush()
return {'done'}
"""

# ARGV[5]=epoch ARGV[6]=n ARGV[7]=owner ARGV[8]=ttl ARGV[9]=nonce prefix ARGV[10]=fence ARGV[11]=me
_LEASE = r"""
local refused = gate(ARGV[10], ARGV[11])
if refused then return refused end
reclaim()
local e, owner = ARGV[5], ARGV[7]
local dls = string.format('%.17g', NOW + tonumber(ARGV[8]))
local popped = redis.call('ZPOPMIN', P..'p:'..e, tonumber(ARGV[6]))
local out = {}
if #popped > 0 then
  local base = nonce_base(#popped / 2)
  cnt(P..'n:'..e, '0', -#popped / 2)
  cnt(P..'n:'..e, '1', #popped / 2)
  for i = 1, #popped, 2 do
    local sid = popped[i]
    local nc = nonce(ARGV[9], base, (i + 1) / 2)
    take_lease(e, sid, owner, nc, dls, '', popped[i + 1])
    out[#out + 1] = sid..'\t'..redis.call('HGET', dkey(e, sid), 'g')..'\t'..nc..'\t'..redis.call('HGET', skey(sid), 'ref')
  end
end
return done({dls, table.concat(out, '\n')})
"""

# ARGV[5]=plan key ARGV[6]=epoch ARGV[7]=world ARGV[8]=batch ARGV[9]=step ARGV[10]=rank ARGV[11]=ttl
# ARGV[12]=wait_for_stream ARGV[13]=nonce prefix ARGV[14]=plan attempt ARGV[15]=fence ARGV[16]=me
_CLAIM_STEP = r"""
local refused = gate(ARGV[14], ARGV[16]) or gate(ARGV[15], ARGV[16])
if refused then return refused end
reclaim()
local key, e = ARGV[5], ARGV[6]
local world, batch, step, rank = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local need = world * batch
local dls = string.format('%.17g', NOW + tonumber(ARGV[11]))
local pk, pq = P..'plan:'..key, P..'p:'..e
local pl = redis.call('HMGET', pk, 'ns', 'es')
local k = tonumber(pl[1] or '0')
if redis.call('HEXISTS', P..'cl:'..key, ARGV[9]..':'..rank) == 1 then return done({'claimed', 0}) end
if pl[2] and step >= tonumber(pl[2]) then return done({'end', redis.call('ZCARD', pq)}) end
local status, first = 'ready', k
while k <= step do
  if redis.call('ZCARD', pq) < need then
    if ARGV[12] == '1' and not closed() then status = 'wait' else status = 'end' end
    break
  end
  local popped = redis.call('ZPOPMIN', pq, need)
  local base = nonce_base(need)
  cnt(P..'n:'..e, '0', -need)
  cnt(P..'n:'..e, '1', need)
  for i = 1, #popped, 2 do
    local j = (i - 1) / 2
    local r = istr(math.floor(j / batch))
    take_lease(e, popped[i], key..'/r'..r, nonce(ARGV[13], base, j + 1), dls, key..'/s'..istr(k)..'/r'..r,
               popped[i + 1])
  end
  k = k + 1
end
-- an ended plan stays ended: ranks must agree on its length forever
if not pl[1] or k > tonumber(pl[1]) then redis.call('HSET', pk, 'ns', istr(k)) end
if status == 'end' and not pl[2] then redis.call('HSET', pk, 'es', istr(k)) end
if not pl[1] then redis.call('SADD', P..'plans', key) end
if status ~= 'ready' then
  local tail = 0
  if status == 'end' then tail = redis.call('ZCARD', pq) end
  return done({status, tail})
end
redis.call('HSET', P..'cl:'..key, ARGV[9]..':'..rank, '1')
apply()
local refresh = step < first  -- a step materialised by this call already has this deadline
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', P..'sl:'..key..'/s'..ARGV[9]..'/r'..rank, 0, -1)) do
  local k2 = dkey(e, sid)
  if refresh then
    redis.call('HSET', k2, 'dl', dls)
    zadd(P..'L', dls, e..':'..sid)
  end
  local d = redis.call('HMGET', k2, 'g', 'n', 'ow')
  out[#out + 1] = sid..'\t'..d[1]..'\t'..d[2]..'\t'..d[3]..'\t'..redis.call('HGET', skey(sid), 'ref')
end
return done({'ready', dls, table.concat(out, '\n')})
"""

# ARGV[5]=ttl ARGV[6]: lines "epoch\tsid\tgen\tnonce"; returns the 1-based indexes lost
_RENEW = r"""
local dls = string.format('%.17g', NOW + tonumber(ARGV[5]))
local lost = {}
for i, line in ipairs(split_on(ARGV[6], '\n')) do
  local q = split_on(line, '\t')
  local e, sid = q[1], q[2]
  local d = redis.call('HMGET', dkey(e, sid), 'g', 's', 'n')
  if d[1] == q[3] and d[2] == '1' and d[3] == q[4] then
    redis.call('HSET', dkey(e, sid), 'dl', dls)
    zadd(P..'L', dls, e..':'..sid)
  else lost[#lost + 1] = i end
end
return done(lost)
"""

# ARGV[5]=step ARGV[6]: lines "epoch\tsid\tgen\tnonce"
_ACK = r"""
local step = ARGV[5]
local floor = tonumber(redis.call('HGET', P..'meta', 'resume_floor') or '0')
if floor > 0 and tonumber(step) <= floor then return {'!floor', istr(floor)} end
local lost = {}
for i, line in ipairs(split_on(ARGV[6], '\n')) do
  local q = split_on(line, '\t')
  local e, sid = q[1], q[2]
  local k = dkey(e, sid)
  local d = redis.call('HMGET', k, 'g', 's', 'n', 'sl')
  -- a repeat ack of the same lease (TRAINED, or DURABLE after a checkpoint) is a no-op
  if d[1] == q[3] and d[3] == q[4] and (d[2] == '1' or d[2] == '2' or d[2] == '3') then
    if d[2] == '1' then
      leave(e, sid, '1', d[4])
      redis.call('HSET', k, 's', '2', 'sp', step)
      cnt(P..'n:'..e, '2', 1)
      zadd(P..'T', step, e..':'..sid)
    end
  else lost[#lost + 1] = i end
end
return done(lost)
"""

# ARGV[5]=retryable ARGV[6]=reason ARGV[7]: lines "epoch\tsid\tgen\tnonce"
_FAIL = r"""
local lost, held = {}, {}
for i, line in ipairs(split_on(ARGV[7], '\n')) do
  local q = split_on(line, '\t')
  local e, sid = q[1], q[2]
  local d = redis.call('HMGET', dkey(e, sid), 'g', 's', 'n', 'sl', 'o')
  if d[1] == q[3] and d[2] == '1' and d[3] == q[4] then
    leave(e, sid, '1', d[4])
    to_pending(e, sid, d[5])
    held[#held + 1] = sid
  else lost[#lost + 1] = i end
end
-- not retryable: the held ones are quarantined in the same script
if ARGV[5] == '0' then
  for _, sid in ipairs(held) do
    local st = redis.call('HGET', skey(sid), 'st')
    restat(sid, st, '2')
    redis.call('HSET', skey(sid), 'st', '2', 'why', ARGV[6])
    drop_undone(sid)
  end
end
return done(lost)
"""

_ABORT = r"""
local freed = {}
for i = 5, #ARGV do
  local sid = ARGV[i]
  local s = redis.call('HMGET', skey(sid), 'st', 'g', 'ref')
  if not s[1] then
    redis.call('HSET', skey(sid), 'g', '0', 'c', '0', 't', '0')
    set_status(sid, nil, '1')
  else
    if s[3] and (s[1] == '0' or s[1] == '2') then freed[#freed + 1] = s[3]; queue_free(s[3]) end
    redis.call('HSET', skey(sid), 't', s[2])
    if s[1] ~= '1' then set_status(sid, s[1], '1') end
    drop_undone(sid)
  end
end
return done(table.concat(freed, '\n'))
"""

# ARGV[5]=step ARGV[6]=free ARGV[7]=retain ARGV[8]=fence ARGV[9]=me
_MARK_DURABLE = r"""
local refused = gate(ARGV[8], ARGV[9])
if refused then return refused end
local _, freed = durable(ARGV[5], ARGV[6] == '1', ARGV[7] == '1')
return done(table.concat(freed, '\n'))
"""

# ARGV[5]=resume step or '' ARGV[6]=free ARGV[7]=strict ARGV[8]=session record json or ''
# ARGV[9]=takeover ARGV[10]=fence of a session known dead or '' ARGV[11]=me ARGV[12]=session ttl
_RECONCILE = r"""
if ARGV[9] ~= '1' then
  local rec, beat = sess_live(ARGV[11], ARGV[10])
  if rec then return {'!session', rec, beat, string.format('%.6f', NOW)} end
end
local after = -1
if ARGV[5] ~= '' then after = tonumber(ARGV[5]) end
if ARGV[7] == '1' then  -- refuse a resume older than what was freed (retention.py)
  local n, lo, hi = 0, nil, nil
  local got = redis.call('ZRANGEBYSCORE', P..'D', '('..istr(after), '+inf', 'WITHSCORES')
  for i = 1, #got, 2 do
    local _, sid = split(got[i])
    if redis.call('HGET', skey(sid), 'st') == '3' then
      local sp = tonumber(got[i + 1])
      n = n + 1
      if not lo or sp < lo then lo = sp end
      if not hi or sp > hi then hi = sp end
    end
  end
  if n > 0 then return {'!old', istr(n), istr(lo), istr(hi), redis.call('HGET', P..'meta', 'marks') or '[]'} end
end
local released, replayed, ndur, freed = 0, 0, 0, {}
for _, m in ipairs(redis.call('ZRANGE', P..'L', 0, -1)) do
  local e, sid = split(m)
  local d = redis.call('HMGET', dkey(e, sid), 'o', 'sl')
  leave(e, sid, '1', d[2]); to_pending(e, sid, d[1])
  released = released + 1
end
local lo = '-inf'
if ARGV[5] ~= '' then lo = '('..ARGV[5] end
apply()
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P..'T', lo, '+inf')) do
  local e, sid = split(m)
  leave(e, sid, '2', nil); to_pending(e, sid, redis.call('HGET', dkey(e, sid), 'o'))
  replayed = replayed + 1
end
-- DURABLE after the resume step: not in the checkpoint being resumed; replayed while the bytes last
for _, m in ipairs(redis.call('ZRANGEBYSCORE', P..'D', '('..istr(after), '+inf')) do
  local e, sid = split(m)
  if redis.call('HGET', skey(sid), 'st') == '0' then
    leave(e, sid, '3', nil); to_pending(e, sid, redis.call('HGET', dkey(e, sid), 'o'))
    replayed = replayed + 1
  end
end
local kept = {}
for _, m in ipairs(cjson.decode(redis.call('HGET', P..'meta', 'marks') or '[]')) do
  if m < after then kept[#kept + 1] = m end
end
if #kept == 0 then redis.call('HDEL', P..'meta', 'marks') else redis.call('HSET', P..'meta', 'marks', cjson.encode(kept)) end
redis.call('HDEL', P..'meta', 'hz')
if ARGV[5] ~= '' then ndur, freed = durable(ARGV[5], ARGV[6] == '1', true) end
for _, key in ipairs(redis.call('SMEMBERS', P..'plans')) do redis.call('DEL', P..'plan:'..key, P..'cl:'..key) end
redis.call('DEL', P..'plans')
if ARGV[5] == '' then  -- a fresh run: back to epoch 0, and each begin_epoch fills in later commits
  for _, k in ipairs(redis.call('HKEYS', P..'meta')) do
    if string.sub(k, 1, 3) == 'ep:' then redis.call('HDEL', P..'meta', k) end
  end
  redis.call('HSET', P..'meta', 'epoch', '0')
end
local attempt = redis.call('HINCRBY', P..'meta', 'attempt', 1)
redis.call('HSET', P..'meta', 'resume_floor', ARGV[5] ~= '' and ARGV[5] or '0')
if ARGV[8] ~= '' then
  local rec = cjson.decode(ARGV[8])
  rec.fence = attempt
  redis.call('HSET', P..'meta', 'sess', cjson.encode(rec), 'sbeat', string.format('%.6f', NOW))
else
  redis.call('HDEL', P..'meta', 'sess', 'sbeat')
end
return done({attempt, replayed, ndur, released, table.concat(freed, '\n')})
"""

_COUNTS = r"""
local epochs, by = {}, {0, 0, 0, 0}
local want = ARGV[5]
for _, e in ipairs(redis.call('SMEMBERS', P..'E')) do
  local n = redis.call('HMGET', P..'n:'..e, '0', '1', '2', '3')
  local total = 0
  for j = 1, 4 do
    local v = tonumber(n[j] or '0')
    total = total + v
    if want == '' or want == e then by[j] = by[j] + v end
  end
  if total > 0 then epochs[#epochs + 1] = e end
end
local st = redis.call('HMGET', P..'stat', '1', '2', '3', 'c')
local c = 0
if closed() then c = 1 end
return {by, st, c, epochs}
"""

# ARGV[5]=owner prefix
_LEASES = r"""
local out, pre = {}, ARGV[5]
for _, m in ipairs(redis.call('ZRANGE', P..'L', 0, -1)) do
  local e, sid = split(m)
  local d = redis.call('HMGET', dkey(e, sid), 'g', 'n', 'ow', 'dl')
  if d[3] and string.sub(d[3], 1, #pre) == pre then
    out[#out + 1] = {e, sid, d[1], d[2], d[3], d[4], redis.call('HGET', skey(sid), 'ref')}
  end
end
return out
"""

_QUARANTINED = r"""
local out = {}
for _, sid in ipairs(redis.call('SMEMBERS', P..'qs')) do
  local s = redis.call('HMGET', skey(sid), 'ref', 'why')
  out[#out + 1] = {s[1] or '', s[2] or ''}
end
return out
"""

_TRAINED = r"""
local out = {}
for _, z in ipairs({'T', 'D'}) do
  for _, m in ipairs(redis.call('ZRANGE', P..z, 0, -1)) do
    local e, sid = split(m)
    if ARGV[5] == '' or ARGV[5] == e then out[#out + 1] = {sid, redis.call('HGET', dkey(e, sid), 'sp')} end
  end
end
return out
"""

_SESSION_GET = r"""
local s = redis.call('HMGET', P..'meta', 'sess', 'sbeat', 'attempt')
return {s[1] or '', s[2] or '', s[3] or '0', string.format('%.6f', NOW)}
"""

# ARGV[5]=fence ARGV[6]=me
_SESSION_BEAT = r"""
local refused = gate(ARGV[5], ARGV[6])
if refused then return refused end
redis.call('HSET', P..'meta', 'sbeat', string.format('%.6f', NOW))
return {'ok'}
"""

# ARGV[5]=fence
_SESSION_CLOSE = r"""
local s = redis.call('HMGET', P..'meta', 'sess', 'attempt')
if s[1] and s[1] ~= '' and cjson.decode(s[1]).fence == tonumber(ARGV[5]) and s[2] == ARGV[5] then
  redis.call('HDEL', P..'meta', 'sess', 'sbeat')
end
return {'ok'}
"""

SCRIPTS: dict[str, str] = {
    name: (src if name == "init" else _PRELUDE + src)
    for name, src in {
        "init": _INIT,
        "reserve": _RESERVE,
        "commit": _COMMIT,
        "begin_epoch": _BEGIN_EPOCH,
        "lease": _LEASE,
        "claim_step": _CLAIM_STEP,
        "renew": _RENEW,
        "ack": _ACK,
        "fail": _FAIL,
        "abort": _ABORT,
        "mark_durable": _MARK_DURABLE,
        "reconcile": _RECONCILE,
        "counts": _COUNTS,
        "leases": _LEASES,
        "quarantined": _QUARANTINED,
        "trained_steps": _TRAINED,
        "requeue_quarantined": REQUEUE,  # issue 15
        "session_get": _SESSION_GET,
        "session_beat": _SESSION_BEAT,
        "session_close": _SESSION_CLOSE,
        **FREEQ_SCRIPTS,  # the delete queue (free_queue.py)
        **REDIS_SCRIPTS,  # producer heartbeats and committed_refs (heartbeats.py)
    }.items()
}
