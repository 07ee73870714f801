"""Lua source of the Redis ledger's ``requeue_quarantined`` (registered in
:data:`torch_dataflow.ledger.redis_scripts.SCRIPTS`; key layout documented there)."""

from __future__ import annotations

__all__ = ["REQUEUE"]

# ARGV[5]='1': every quarantined id; else ARGV[6..] are the ids to requeue
REQUEUE = r"""
local ids = {}
if ARGV[5] == '1' then ids = redis.call('SMEMBERS', P..'qs')
else for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end end
local epochs, seen = {}, {}
local cur = redis.call('HGET', P..'meta', 'epoch') or '0'
epochs[1], seen[cur] = cur, true
for _, k in ipairs(redis.call('HKEYS', P..'meta')) do
  local e = string.match(k, '^ep:(%d+)$')
  if e and not seen[e] then epochs[#epochs + 1] = e; seen[e] = true end
end
local n, done_ids = 0, {}
for _, sid in ipairs(ids) do
  local s = redis.call('HMGET', skey(sid), 'st', 'c', 'q')
  if s[1] == '2' and not done_ids[sid] then
    done_ids[sid] = true
    set_status(sid, '2', '0')
    redis.call('HDEL', skey(sid), 'why')
    for _, e in ipairs(epochs) do
      if redis.call('EXISTS', dkey(e, sid)) == 0 then
        redis.call('HSET', dkey(e, sid), 'g', s[2], 'o', s[3], 's', '0')
        zadd(P..'p:'..e, s[3], sid)
        cnt(P..'n:'..e, '0', 1)
        redis.call('SADD', P..'de:'..sid, e)
        redis.call('SADD', P..'E', e)
      end
    end
    n = n + 1
  end
end
return done(n)
"""
