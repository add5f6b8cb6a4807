-- Wireshark / tshark dissector for the Machnet transport header (docs/protocol.md).
--
--   tshark -X lua_script:tools/wireshark/machnet.lua -r capture.pcapng
--   wireshark -X lua_script:tools/wireshark/machnet.lua capture.pcapng
--   (or copy this file into ~/.local/lib/wireshark/plugins/)
--
-- Machnet runs over UDP on whatever ports its flows use (a listener's port, clients' ports from
-- 1024 up), so the dissector is registered as a UDP heuristic: a UDP payload of at least 54
-- bytes starting with the magic 0x4E53 ("NS") is Machnet. It is also offered for "Decode As"
-- on any UDP port (the "machnet.udp.port" table).
--
-- Fields (filter names): machnet.magic, machnet.type, machnet.flags (machnet.flags.first,
-- .more, .last, .chain, .acks_in_data, .notify), machnet.seq, machnet.ack, machnet.sack
-- (the four words: machnet.sack.w0 .. w3, and machnet.sack.held: the distances they mark),
-- machnet.sack_count, machnet.timestamp, and on flows with ACKs in DATA the two halves
-- machnet.ts.sender and machnet.ts.echo; machnet.payload_len.

local machnet = Proto("machnet", "Machnet transport")

local types = { [0x00] = "DATA", [0x01] = "SYN", [0x02] = "ACK", [0x03] = "SYN-ACK", [0x80] = "RST" }

local f = machnet.fields
f.magic = ProtoField.uint16("machnet.magic", "Magic", base.HEX)
f.type = ProtoField.uint8("machnet.type", "Type", base.HEX, types)
f.flags = ProtoField.uint8("machnet.flags", "Flags", base.HEX)
f.first = ProtoField.bool("machnet.flags.first", "FIRST", 8, nil, 0x01)
f.more = ProtoField.bool("machnet.flags.more", "MORE", 8, nil, 0x02)
f.last = ProtoField.bool("machnet.flags.last", "LAST", 8, nil, 0x04)
f.chain = ProtoField.bool("machnet.flags.chain", "CHAIN", 8, nil, 0x08)
f.acks = ProtoField.bool("machnet.flags.acks_in_data", "ACKS_IN_DATA", 8, nil, 0x40)
f.notify = ProtoField.bool("machnet.flags.notify", "NOTIFY_DELIVERY", 8, nil, 0x80)
f.seq = ProtoField.uint32("machnet.seq", "Sequence number", base.DEC)
f.ack = ProtoField.uint32("machnet.ack", "Cumulative ack (next expected)", base.DEC)
f.sack = ProtoField.bytes("machnet.sack", "SACK bitmap")
f.w0 = ProtoField.uint64("machnet.sack.w0", "SACK word 0 (distances 192-255)", base.HEX)
f.w1 = ProtoField.uint64("machnet.sack.w1", "SACK word 1 (distances 128-191)", base.HEX)
f.w2 = ProtoField.uint64("machnet.sack.w2", "SACK word 2 (distances 64-127)", base.HEX)
f.w3 = ProtoField.uint64("machnet.sack.w3", "SACK word 3 (distances 0-63)", base.HEX)
f.held = ProtoField.string("machnet.sack.held", "Held above ack (distances)")
f.sack_count = ProtoField.uint16("machnet.sack_count", "SACK count", base.DEC)
f.ts = ProtoField.uint64("machnet.timestamp", "Timestamp", base.DEC)
f.ts_sender = ProtoField.uint32("machnet.ts.sender", "Sender clock (low 32 bits, ns)", base.DEC)
f.ts_echo = ProtoField.uint32("machnet.ts.echo", "Echo plus hold time (low 32 bits, ns)", base.DEC)
f.payload_len = ProtoField.uint32("machnet.payload_len", "Payload length", base.DEC)

local HEADER_LEN = 54

-- The distances marked in the four SACK words (bit i mod 64 of word 3 - i / 64).
local function held(tvb)
  local out = {}
  for i = 0, 255 do
    local word = 3 - math.floor(i / 64)
    local bit = i % 64
    -- Byte of the big-endian word that holds this bit, and the bit inside it.
    local byte = tvb(12 + word * 8 + 7 - math.floor(bit / 8), 1):uint()
    if math.floor(byte / 2 ^ (bit % 8)) % 2 == 1 then out[#out + 1] = tostring(i) end
  end
  return table.concat(out, ",")
end

local function dissect(tvb, pinfo, tree)
  if tvb:len() < HEADER_LEN or tvb(0, 2):uint() ~= 0x4E53 then
    return 0
  end
  pinfo.cols.protocol = "Machnet"
  local t = tvb(2, 1):uint()
  local flags = tvb(3, 1):uint()
  local seq = tvb(4, 4):uint()
  local ack = tvb(8, 4):uint()
  local sub = tree:add(machnet, tvb(0, HEADER_LEN), "Machnet, " .. (types[t] or string.format("type 0x%02x", t)))
  sub:add(f.magic, tvb(0, 2))
  sub:add(f.type, tvb(2, 1))
  local fl = sub:add(f.flags, tvb(3, 1))
  fl:add(f.first, tvb(3, 1))
  fl:add(f.more, tvb(3, 1))
  fl:add(f.last, tvb(3, 1))
  fl:add(f.chain, tvb(3, 1))
  fl:add(f.acks, tvb(3, 1))
  fl:add(f.notify, tvb(3, 1))
  sub:add(f.seq, tvb(4, 4))
  sub:add(f.ack, tvb(8, 4))
  local s = sub:add(f.sack, tvb(12, 32))
  s:add(f.w0, tvb(12, 8))
  s:add(f.w1, tvb(20, 8))
  s:add(f.w2, tvb(28, 8))
  s:add(f.w3, tvb(36, 8))
  local h = held(tvb)
  if h ~= "" then s:add(f.held, tvb(12, 32), h) end
  sub:add(f.sack_count, tvb(44, 2))
  sub:add(f.ts, tvb(46, 8))
  -- Flows with ACKs in DATA split the timestamp: sender's clock high, echo low.
  local split = (t == 0x00 and ack ~= 0xFFFFFFFF) or t == 0x02
  if split then
    sub:add(f.ts_sender, tvb(46, 4))
    sub:add(f.ts_echo, tvb(50, 4))
  end
  local payload = tvb:len() - HEADER_LEN
  sub:add(f.payload_len, payload):set_generated()
  local info = string.format("%s seq=%d", types[t] or "?", seq)
  if t ~= 0x00 or ack ~= 0xFFFFFFFF then info = info .. string.format(" ack=%d", ack) end
  if tvb(44, 2):uint() > 0 then info = info .. string.format(" sack=%d", tvb(44, 2):uint()) end
  if payload > 0 then info = info .. string.format(" len=%d", payload) end
  pinfo.cols.info = info
  if payload > 0 then
    Dissector.get("data"):call(tvb(HEADER_LEN):tvb(), pinfo, tree)
  end
  return tvb:len()
end

machnet.dissector = function(tvb, pinfo, tree)
  return dissect(tvb, pinfo, tree)
end

local function heuristic(tvb, pinfo, tree)
  return dissect(tvb, pinfo, tree) > 0
end

machnet:register_heuristic("udp", heuristic)
DissectorTable.get("udp.port"):add_for_decode_as(machnet)
