#!lua name=fanout
-- Publishing with history, callable by any Redis client:
--   FCALL fanout_publish 1 <channel> <data> [<event> [<idempotency-key> [<stream> <seq>]]]
-- appends to the bounded stream fanout:history:{<channel>} and PUBLISHes a gateway
-- frame carrying the new id, so every node delivers it with its position. It answers
-- {id, receivers}; receivers is -1 for a repeat (an idempotency key seen within its
-- window: id is the first publish's). A message of a publishing stream (<stream>, a
-- name unique to one streaming request, and <seq> = 1, 2, 3...) is published only in
-- order: a repeat of the stream's latest or an earlier seq is a repeat (id: the
-- latest's, or empty for an earlier one), a seq past the next one is an error.
--   FCALL_RO fanout_since 1 <channel> <id> <count> [<max-bytes>]
-- returns {status, entries, last}: 'ok' when history covers everything after <id>
-- (entries = XRANGE after it), 'reset' when it cannot; <id> 0-0 is the start of
-- retained history, 'trimmed' when its oldest messages are gone (see `since` below).
--   FCALL_RO fanout_head 1 <channel>
-- returns the id of the channel's newest message, or nil.
-- The gateway fills in the limits below when it loads this library.
local MAXLEN = __MAXLEN__
local MAXAGE_MS = __MAXAGE_MS__
local KEY_TTL_MS = __KEY_TTL_MS__
local IDEM_MS = __IDEM_MS__
local MAGIC = '\0fo1\n'

local function stream_key(ch) return 'fanout:history:{' .. ch .. '}' end

-- Whether decimal number a < b, for digit strings without leading zeros (any length:
-- Lua's numbers cannot hold every 64-bit value).
local function num_less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

-- Whether stream id a < b (ids as Redis and the gateway write them: <ms>-<seq>).
local function id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if ams == nil or bms == nil then return false end
  if ams ~= bms then return num_less(ams, bms) end
  return num_less(aseq, bseq)
end

local function publish(keys, args)
  local ch = keys[1]
  local data = args[1]
  if ch == nil or data == nil then
    return redis.error_reply(
      'usage: FCALL fanout_publish 1 <channel> <data> [<event> [<idempotency-key> [<stream> <seq>]]]')
  end
  local event = args[2] or ''
  local idem = args[3] or ''
  local sid = args[4] or ''
  local seq = tonumber(args[5] or '0')
  local ikey = nil
  if idem ~= '' then
    ikey = 'fanout:idem:{' .. ch .. '}:' .. idem
    local prev = redis.call('GET', ikey)
    if prev then return {prev, -1} end
  end
  local skey = nil
  if sid ~= '' then
    skey = 'fanout:seq:{' .. ch .. '}'
    local last, last_id = 0, ''
    local prev = redis.call('HGET', skey, sid)
    if prev then
      local n, i = string.match(prev, '^(%d+) (.*)$')
      last, last_id = tonumber(n), i
    end
    if seq == nil or seq < 1 then return redis.error_reply('stream seq must be 1 or more') end
    if seq <= last then
      if seq == last then return {last_id, -1} end
      return {'', -1}
    end
    if seq > last + 1 then
      return redis.error_reply('stream out of order: expected seq ' .. (last + 1) .. ', got ' .. seq)
    end
  end
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local key = stream_key(ch)
  local id
  if event ~= '' then
    id = redis.call('XADD', key, 'MAXLEN', '~', MAXLEN, '*', 'd', data, 'e', event)
  else
    id = redis.call('XADD', key, 'MAXLEN', '~', MAXLEN, '*', 'd', data)
  end
  if MAXAGE_MS > 0 then
    redis.call('XTRIM', key, 'MINID', '~', (now_ms - MAXAGE_MS) .. '-0')
  end
  redis.call('PEXPIRE', key, KEY_TTL_MS)
  if ikey then redis.call('SET', ikey, id, 'PX', IDEM_MS) end
  if skey then
    redis.call('HSET', skey, sid, seq .. ' ' .. id)
    redis.call('PEXPIRE', skey, KEY_TTL_MS)
  end
  local header = '{"id":"' .. id .. '","ts":' .. now_ms
  if event ~= '' then header = header .. ',"event":' .. cjson.encode(event) end
  local n = redis.call('PUBLISH', ch, MAGIC .. header .. '}\n' .. data)
  return {id, n}
end

-- What history holds after <from>: {status, entries, last}, where last is the newest id
-- ('0-0' if none). Trimming only ever removes the oldest entries, so every entry after
-- an id that is still in the stream is still there too.
--   ok      history covers everything after <from>: entries are all of it.
--   trimmed <from> is 0-0 ("from the start of retained history") and the oldest
--           messages are gone: entries are all that is left.
--   reset   history cannot cover the gap (the id was trimmed or expired, the stream
--           was wiped, or the id is after the newest one): no entries.
-- At most <count> entries, and no more once their data holds <max-bytes> (at least
-- one): a page; the caller asks again from the page's last id while it is before last.
local function page(entries, max_bytes)
  if max_bytes == nil then return entries end
  local out, bytes = {}, 0
  for _, e in ipairs(entries) do
    if #out > 0 and bytes >= max_bytes then break end
    table.insert(out, e)
    local fields = e[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then bytes = bytes + #fields[i + 1] end
    end
  end
  return out
end

local function since(keys, args)
  local key = stream_key(keys[1])
  local from = args[1] or '0-0'
  local count = tonumber(args[2] or '1000')
  local max_bytes = tonumber(args[3] or '')
  if redis.call('EXISTS', key) == 0 then
    if from == '0-0' then return {'ok', {}, '0-0'} end
    return {'reset', {}, '0-0'}
  end
  local info = redis.call('XINFO', 'STREAM', key)
  local last, length, added = '0-0', 0, 0
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
    if info[i] == 'length' then length = info[i + 1] end
    if info[i] == 'entries-added' then added = info[i + 1] end
  end
  if from == last then return {'ok', {}, last} end
  if from == '0-0' then
    -- Trimming leaves max-deleted-entry-id alone; fewer entries than were ever added
    -- means the oldest are gone.
    local entries = page(redis.call('XRANGE', key, '-', '+', 'COUNT', count), max_bytes)
    if added == length then return {'ok', entries, last} end
    return {'trimmed', entries, last}
  end
  if id_less(last, from) or #redis.call('XRANGE', key, from, from) == 0 then
    return {'reset', {}, last}
  end
  return {'ok', page(redis.call('XRANGE', key, '(' .. from, '+', 'COUNT', count), max_bytes), last}
end

local function head(keys, args)
  local key = stream_key(keys[1])
  if redis.call('EXISTS', key) == 0 then return false end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return false
end

redis.register_function('fanout_publish', publish)
redis.register_function{function_name = 'fanout_head', callback = head, flags = {'no-writes'}}
redis.register_function{function_name = 'fanout_since', callback = since, flags = {'no-writes'}}
