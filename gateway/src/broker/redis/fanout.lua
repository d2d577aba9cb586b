#!lua name=fanout
-- Publishing with history, callable by any Redis client:
--   FCALL fanout_publish 1 <channel> <data> [<event> [<idempotency-key> [<stream> <seq> [<again>]]]]
-- appends to the bounded stream fanout:history:{<channel>} and PUBLISHes (SPUBLISH on
-- a Redis Cluster) a gateway frame carrying the new id, so every node delivers it with
-- its position. The key may also be the history key itself, fanout:history:{<channel>}
-- (the gateway passes that one: on a cluster, a key that exists keeps the call on the
-- node holding the history while the slot migrates); every function takes either. It answers
-- {id, receivers}; receivers is -1 for a repeat (an idempotency key seen within its
-- window: id is the first publish's). A message of a publishing stream (<stream>, a
-- name unique to one streaming request, and <seq> = 1, 2, 3...) carries 's<stream>:<seq>'
-- in its entry. The publisher sends a stream's messages in order over one connection,
-- so a first attempt is just appended; one sent <again> ('1': after a lost connection,
-- whether it ran is unknown) is checked against the stream's newest entry in history:
-- a repeat of that seq or an earlier one is a repeat (id: the newest's, or empty for
-- an earlier one), a seq past the next one is an error. The check reads back at most
-- the history's length.
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

-- The channel a function was called for: its key is the channel or one of its keys
-- (fanout:history:{<channel>}, fanout:occupancy:{<channel>}).
local function channel_of(key)
  if key == nil then return nil end
  return string.match(key, '^fanout:%a+:{(.*)}$') or key
end

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

-- The seq and id of stream <sid>'s newest message in history at <key>: 0, '' if none
-- is (none was published, or it is older than everything history holds).
local function stream_last(key, sid)
  local prefix = 's' .. sid .. ':'
  local entries = redis.call('XREVRANGE', key, '+', '-', 'COUNT', MAXLEN)
  for _, e in ipairs(entries) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'k' and string.sub(f[i + 1], 1, #prefix) == prefix then
        return tonumber(string.sub(f[i + 1], #prefix + 1)), e[1]
      end
    end
  end
  return 0, ''
end

local function publish(keys, args)
  local ch = channel_of(keys[1])
  local data = args[1]
  if ch == nil or data == nil then
    return redis.error_reply(
      'usage: FCALL fanout_publish 1 <channel> <data> [<event> [<idempotency-key> [<stream> <seq> [<again>]]]]')
  end
  local event = args[2] or ''
  local idem = args[3] or ''
  local sid = args[4] or ''
  local seq = tonumber(args[5] or '0')
  local again = args[6] == '1'
  local key = stream_key(ch)
  local ikey = nil
  if idem ~= '' then
    ikey = 'fanout:idem:{' .. ch .. '}:' .. idem
    local prev = redis.call('GET', ikey)
    if prev then return {prev, -1} end
  end
  if sid ~= '' then
    if seq == nil or seq < 1 then return redis.error_reply('stream seq must be 1 or more') end
    if again then
      local last, last_id = stream_last(key, sid)
      if seq <= last then
        if seq == last then return {last_id, -1} end
        return {'', -1}
      end
      if last > 0 and seq > last + 1 then
        return redis.error_reply('stream out of order: expected seq ' .. (last + 1) .. ', got ' .. seq)
      end
    end
  end
  -- What makes a retry the same message, carried in the frame and the entry, so a node
  -- can drop a repeat that a failover let through under a new id.
  local dedupe = ''
  if idem ~= '' then dedupe = 'i' .. idem elseif sid ~= '' then dedupe = 's' .. sid .. ':' .. seq end
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local id
  local fields = {'d', data}
  if event ~= '' then fields[#fields + 1] = 'e'; fields[#fields + 1] = event end
  if dedupe ~= '' then fields[#fields + 1] = 'k'; fields[#fields + 1] = dedupe end
  id = redis.call('XADD', key, 'MAXLEN', '~', MAXLEN, '*', unpack(fields))
  if MAXAGE_MS > 0 then
    redis.call('XTRIM', key, 'MINID', '~', (now_ms - MAXAGE_MS) .. '-0')
  end
  redis.call('PEXPIRE', key, KEY_TTL_MS)
  if ikey then redis.call('SET', ikey, id, 'PX', IDEM_MS) end
  local header = '{"id":"' .. id .. '","ts":' .. now_ms
  if event ~= '' then header = header .. ',"event":' .. cjson.encode(event) end
  if dedupe ~= '' then header = header .. ',"key":' .. cjson.encode(dedupe) end
  local n = redis.call('__PUBLISH__', ch, MAGIC .. header .. '}\n' .. data)
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

-- An id inside the stream's range that it never held comes from a fork: a Redis Cluster
-- master failed before its replica had its newest messages, which subscribers had
-- already seen. What came after it is all here ('ok'); a republished message among it
-- carries its key ('k'), so nodes drop the repeat.
local function since(keys, args)
  local key = stream_key(channel_of(keys[1]))
  local from = args[1] or '0-0'
  local count = tonumber(args[2] or '1000')
  local max_bytes = tonumber(args[3] or '')
  if redis.call('EXISTS', key) == 0 then
    if from == '0-0' then return {'ok', {}, '0-0'} end
    return {'reset', {}, '0-0'}
  end
  local info = redis.call('XINFO', 'STREAM', key)
  local last, length, added, first = '0-0', 0, 0, nil
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
    if info[i] == 'length' then length = info[i + 1] end
    if info[i] == 'entries-added' then added = info[i + 1] end
    if info[i] == 'first-entry' and type(info[i + 1]) == 'table' then first = info[i + 1][1] end
  end
  if from == last then return {'ok', {}, last} end
  if from == '0-0' then
    -- Trimming leaves max-deleted-entry-id alone; fewer entries than were ever added
    -- means the oldest are gone.
    local entries = page(redis.call('XRANGE', key, '-', '+', 'COUNT', count), max_bytes)
    if added == length then return {'ok', entries, last} end
    return {'trimmed', entries, last}
  end
  if id_less(last, from) then return {'reset', {}, last} end
  if #redis.call('XRANGE', key, from, from) == 0 then
    if first == nil or not id_less(first, from) then return {'reset', {}, last} end
  end
  return {'ok', page(redis.call('XRANGE', key, '(' .. from, '+', 'COUNT', count), max_bytes), last}
end

local function head(keys, args)
  local key = stream_key(channel_of(keys[1]))
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

-- Subscriber counts per node, for the cluster-wide occupancy of a channel: a hash
-- fanout:occupancy:{<channel>} of <node> -> '<count> <expires-ms>', by Redis's clock.
--   FCALL fanout_occupancy_report 1 <channel> <node> <count> <ttl-ms>
-- records a node's count (0 removes it) and drops entries that expired.
--   FCALL_RO fanout_occupancy 1 <channel> <node-to-skip>
-- returns {subscribers, nodes} over the entries that have not expired.
local function occupancy_key(ch) return 'fanout:occupancy:{' .. ch .. '}' end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function occupancy_report(keys, args)
  local key = occupancy_key(channel_of(keys[1]))
  local node, count, ttl = args[1], tonumber(args[2] or '0'), tonumber(args[3] or '15000')
  local now = now_ms()
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local expires = tonumber(string.match(all[i + 1], ' (%d+)$') or '0')
    if expires <= now then redis.call('HDEL', key, all[i]) end
  end
  if count > 0 then
    redis.call('HSET', key, node, count .. ' ' .. (now + ttl))
    redis.call('PEXPIRE', key, ttl * 2)
  else
    redis.call('HDEL', key, node)
  end
  return 1
end

local function occupancy(keys, args)
  local key = occupancy_key(channel_of(keys[1]))
  local skip = args[1] or ''
  local now = now_ms()
  local all = redis.call('HGETALL', key)
  local subscribers, nodes = 0, 0
  for i = 1, #all, 2 do
    local count, expires = string.match(all[i + 1], '^(%d+) (%d+)$')
    if all[i] ~= skip and count and tonumber(expires) > now and tonumber(count) > 0 then
      subscribers = subscribers + tonumber(count)
      nodes = nodes + 1
    end
  end
  return {subscribers, nodes}
end

redis.register_function('fanout_occupancy_report', occupancy_report)
redis.register_function{function_name = 'fanout_occupancy', callback = occupancy, flags = {'no-writes'}}
