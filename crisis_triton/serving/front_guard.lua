-- The front's request checks (crisis_triton/serving/front.py renders the nginx configuration that loads this
-- module; docs/security.md lists every attack class and what stops it). nginx alone can count
-- bytes; these checks look inside a request before tritonserver does:
--
--   * compressed request bodies are refused (Triton would inflate them past the byte cap);
--   * a request body must arrive whole within a deadline (a slow body is cut, never proxied);
--   * only bodies that arrived whole count against the limit of requests in flight, so clients
--     dripping their bodies cannot starve the others (nginx's limit_conn counts from the headers);
--   * the JSON of an HTTP inference request (all of a JSON body, or the JSON header of the binary
--     form) is parsed here with a nesting limit and checked against the shape of KServe's v2
--     request, so that nothing reaches Triton's recursive JSON parser that could exhaust its stack,
--     and a malformed request gets 400 here where Triton would answer 500;
--   * a gRPC call must name the public model: the front reads every model-name field of the
--     protobuf message (a repeated field would otherwise let the last one win inside Triton).
--
-- Counters of what was refused, by reason, live in the shared dictionary `front_state`.

local cjson_safe = require("cjson.safe")

local M = {}

local cfg = nil
local json = nil -- a cjson instance with the nesting limit
local state = ngx.shared.front_state

local byte, sub, find, floor = string.byte, string.sub, string.find, math.floor

-- gRPC status codes (grpc/doc/statuscodes.md)
local GRPC_INVALID_ARGUMENT = 3
local GRPC_NOT_FOUND = 5
local GRPC_UNIMPLEMENTED = 12
local GRPC_UNAVAILABLE = 14

-- ---------------------------------------------------------------------------------- set-up

--- Called once from init_by_lua with the limits crisis_triton/serving/front.py rendered (a JSON text).
function M.configure(text)
    cfg = assert(cjson_safe.decode(text), "front_guard: bad configuration")
    json = cjson_safe.new()
    json.decode_max_depth(cfg.max_json_depth)
    json.decode_invalid_numbers(false)
    M.public_model = cfg.public_model
end

-- ---------------------------------------------------------------------------------- answers

-- Every refusal passes here: counted, and named in the access log ($front_refused, declared
-- by front.py's servers; log_by_lua runs before nginx writes the access log line).
local function count(reason)
    state:incr("refused:" .. reason, 1, 0)
    ngx.var.front_refused = reason
end

local function http_refuse(status, reason, message, retry_after)
    count(reason)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    if retry_after then
        ngx.header["Retry-After"] = tostring(retry_after)
    end
    ngx.say(cjson_safe.encode({ error = message .. " (front)" }))
    return ngx.exit(ngx.HTTP_OK)
end

local function grpc_refuse(code, reason, message)
    count(reason)
    -- A trailers-only gRPC answer: the status in the headers, no message, the stream ended with
    -- the headers (a 204 is one HEADERS frame). nginx only sends it once the body was read or
    -- discarded.
    if not ngx.ctx.body_touched then
        ngx.req.discard_body()
    end
    ngx.header["Content-Type"] = "application/grpc"
    ngx.header["grpc-status"] = tostring(code)
    ngx.header["grpc-message"] = ngx.escape_uri(message .. " (front)")
    return ngx.exit(ngx.HTTP_NO_CONTENT)
end

-- ---------------------------------------------------------------------------------- bodies

--- The header's values as a list (a header sent twice is a table in ngx.req.get_headers).
local function header_values(name)
    local value = ngx.req.get_headers(100)[name]
    if value == nil then
        return {}
    elseif type(value) == "table" then
        return value
    end
    return { value }
end

--- True when every value of the encoding header is empty or "identity".
local function identity_only(name)
    for _, value in ipairs(header_values(name)) do
        for token in string.gmatch(value, "[^,%s]+") do
            if string.lower(token) ~= "identity" then
                return false
            end
        end
    end
    return true
end

--- Reads the whole request body, or gives up at the body deadline (counted from the request's
--- start). Returns true when the body is in, false when the deadline passed.
local function read_body_within_deadline()
    local remaining = cfg.body_deadline_s - (ngx.now() - ngx.req.start_time())
    if remaining <= 0 then
        return false
    end
    ngx.ctx.body_touched = true
    local reader = ngx.thread.spawn(function()
        ngx.req.read_body()
        return "body"
    end)
    local timer = ngx.thread.spawn(function()
        ngx.sleep(remaining)
        return "deadline"
    end)
    local _, which = ngx.thread.wait(reader, timer)
    if which == "deadline" then
        ngx.thread.kill(reader)
        return false
    end
    ngx.thread.kill(timer)
    return true
end

--- The first `limit` bytes of the body (all of it when limit is nil), from memory or from the
--- temporary file nginx buffered it to.
local function body_bytes(limit)
    local data = ngx.req.get_body_data()
    if data ~= nil then
        return limit and sub(data, 1, limit) or data
    end
    local path = ngx.req.get_body_file()
    if path == nil then
        return ""
    end
    local file = io.open(path, "rb")
    if file == nil then
        return nil
    end
    local out = file:read(limit or "*a") or ""
    file:close()
    return out
end

-- ---------------------------------------------------------------------------------- in flight

--- Counts this request against the limit of requests in flight (once its body is in); false
--- when the limit is reached. M.done() (log phase) gives the slot back.
local function take_slot()
    local n = state:incr("in_flight", 1, 0)
    if n > cfg.max_in_flight then
        state:incr("in_flight", -1, 0)
        return false
    end
    -- an nginx variable, not ngx.ctx: it survives the internal redirect to an error page
    ngx.var.front_slot = "1"
    return true
end

--- log_by_lua of every request: the slot it held (if any) is given back, however it ended.
function M.done()
    if ngx.var.front_slot == "1" then
        ngx.var.front_slot = ""
        state:incr("in_flight", -1, 0)
    end
end

-- ---------------------------------------------------------------------------------- HTTP JSON

local function is_count(v)
    return type(v) == "number" and v >= 0 and v == floor(v) and v < 2 ^ 53
end

local function is_array(v)
    -- cjson decodes [] and {} alike to an empty table; a JSON array has only keys 1..n
    if type(v) ~= "table" then
        return false
    end
    local n = 0
    for _ in pairs(v) do
        n = n + 1
    end
    for i = 1, n do
        if v[i] == nil then
            return false
        end
    end
    return true
end

local function is_object(v)
    if type(v) ~= "table" then
        return false
    end
    return next(v) == nil or not is_array(v)
end

--- A leaf check of `data` for the input's datatype: strings for BYTES, numbers (and booleans
--- for BOOL) for the others; nested arrays are allowed (Triton flattens them).
local function data_ok(data, datatype)
    if type(data) ~= "table" then
        if datatype == "BYTES" then
            return type(data) == "string"
        elseif datatype == "BOOL" then
            return type(data) == "boolean"
        end
        return type(data) == "number"
    end
    if not is_array(data) then
        return false
    end
    for _, item in ipairs(data) do
        if not data_ok(item, datatype) then
            return false
        end
    end
    return true
end

local function check_parameters(value, where)
    if value ~= nil and not is_object(value) then
        return where .. ": 'parameters' must be a JSON object"
    end
    return nil
end

--- Nil when `request` (decoded JSON) has the shape of a v2 inference request, else why not.
local function infer_request_error(request)
    if not is_object(request) then
        return "the request must be a JSON object"
    end
    if request.id ~= nil and type(request.id) ~= "string" then
        return "'id' must be a string"
    end
    local err = check_parameters(request.parameters, "the request")
    if err then
        return err
    end
    if not is_array(request.inputs) then
        return "'inputs' must be a JSON array"
    end
    for i, input in ipairs(request.inputs) do
        local where = "input " .. i
        if not is_object(input) then
            return where .. " must be a JSON object"
        end
        if type(input.name) ~= "string" then
            return where .. ": 'name' must be a string"
        end
        where = "input '" .. input.name .. "'"
        if type(input.datatype) ~= "string" then
            return where .. ": 'datatype' must be a string"
        end
        if not is_array(input.shape) then
            return where .. ": 'shape' must be an array of non-negative integers"
        end
        for _, dim in ipairs(input.shape) do
            if not is_count(dim) then
                return where .. ": 'shape' must be an array of non-negative integers"
            end
        end
        err = check_parameters(input.parameters, where)
        if err then
            return err
        end
        local size = input.parameters and input.parameters.binary_data_size
        if size ~= nil and not is_count(size) then
            return where .. ": 'binary_data_size' must be a non-negative integer"
        end
        if input.data ~= nil then
            if not is_array(input.data) then
                return where .. ": 'data' must be a JSON array"
            end
            if not data_ok(input.data, input.datatype) then
                return where .. ": 'data' holds values that are not of type " .. input.datatype
            end
        end
    end
    if request.outputs ~= nil then
        if not is_array(request.outputs) then
            return "'outputs' must be a JSON array"
        end
        for i, output in ipairs(request.outputs) do
            if not is_object(output) or type(output.name) ~= "string" then
                return "output " .. i .. " must be a JSON object with a string 'name'"
            end
            err = check_parameters(output.parameters, "output '" .. output.name .. "'")
            if err then
                return err
            end
        end
    end
    return nil
end

--- The JSON part of an HTTP body: all of it, or the binary form's header
--- (Inference-Header-Content-Length). Returns text, or nil with the status and message.
--- The body's length in bytes: its Content-Length, else (a chunked body, read) what was read.
local function body_length()
    local declared = tonumber(ngx.var.content_length)
    if declared then
        return declared
    end
    local data = ngx.req.get_body_data()
    if data then
        return #data
    end
    local path = ngx.req.get_body_file()
    local file = path and io.open(path, "rb")
    if not file then
        return 0
    end
    local size = file:seek("end")
    file:close()
    return size or 0
end

local function json_part()
    local lengths = header_values("inference-header-content-length")
    local body_length = body_length()
    if #lengths == 0 then
        if body_length > cfg.max_json_body_bytes then
            return nil, 413, "a JSON request body is limited to " .. cfg.max_json_body_bytes
                .. " bytes (images travel in the binary form)"
        end
        return body_bytes(nil)
    end
    local n = #lengths == 1 and string.match(lengths[1], "^%s*(%d+)%s*$")
    n = n and tonumber(n)
    if not n or n < 1 or n > body_length then
        return nil, 400, "Inference-Header-Content-Length must be one integer within the body's length"
    end
    if n > cfg.max_json_header_bytes then
        return nil, 413, "the JSON header of a binary request is limited to "
            .. cfg.max_json_header_bytes .. " bytes"
    end
    return body_bytes(n)
end

local function read_body_http()
    if not identity_only("content-encoding") then
        return http_refuse(415, "compressed", "compressed request bodies are not accepted "
            .. "(Content-Encoding): send the body uncompressed")
    end
    if not read_body_within_deadline() then
        return http_refuse(408, "slow_body", "the request body did not arrive within "
            .. cfg.body_deadline_s .. " s")
    end
end

-- cjson decodes [] and {} alike (an empty table): an empty object where the request needs an
-- array, or an empty array for parameters, is found in the text (Triton would answer 500).
local EMPTY_MISMATCH = {
    { '"inputs"%s*:%s*{%s*}', "'inputs' must be a JSON array" },
    { '"outputs"%s*:%s*{%s*}', "'outputs' must be a JSON array" },
    { '"shape"%s*:%s*{%s*}', "'shape' must be an array of non-negative integers" },
    { '"data"%s*:%s*{%s*}', "'data' must be a JSON array" },
    { '"parameters"%s*:%s*%[%s*%]', "'parameters' must be a JSON object" },
}

--- access_by_lua of the public model's HTTP inference endpoint.
function M.http_infer()
    read_body_http()
    local text, status, message = json_part()
    if text == nil then
        return http_refuse(status or 400, "bad_request", message or "the body could not be read")
    end
    for _, rule in ipairs(EMPTY_MISMATCH) do
        if find(text, rule[1]) then
            return http_refuse(400, "bad_request", "not a v2 inference request: " .. rule[2])
        end
    end
    local request, err = json.decode(text)
    if request == nil then
        local reason = find(err or "", "nested", 1, true) and "too_deep" or "bad_json"
        return http_refuse(400, reason, "the request is not valid JSON ("
            .. tostring(err) .. "; nesting is limited to " .. cfg.max_json_depth .. " levels)")
    end
    err = infer_request_error(request)
    if err then
        return http_refuse(400, "bad_request", "not a v2 inference request: " .. err)
    end
    if not take_slot() then
        return http_refuse(503, "over_limit", "over " .. cfg.max_in_flight
            .. " requests in flight: retry later", 1)
    end
end

--- access_by_lua of the other HTTP endpoints that take a body (the restricted APIs, which
--- Triton checks for the admin key): the same encoding, deadline and JSON nesting rules.
function M.http_other()
    read_body_http()
    local body = body_bytes(nil)
    if body == nil then
        return http_refuse(400, "bad_request", "the body could not be read")
    end
    if #body > cfg.max_json_header_bytes then
        return http_refuse(413, "too_large", "bodies of this endpoint are limited to "
            .. cfg.max_json_header_bytes .. " bytes")
    end
    if #body > 0 then
        local value, err = json.decode(body)
        if value == nil then
            return http_refuse(400, "bad_json", "the body is not valid JSON (" .. tostring(err)
                .. "; nesting is limited to " .. cfg.max_json_depth .. " levels)")
        end
    end
    if not take_slot() then
        return http_refuse(503, "over_limit", "over " .. cfg.max_in_flight
            .. " requests in flight: retry later", 1)
    end
end

-- ---------------------------------------------------------------------------------- gRPC

-- Methods of inference.GRPCInferenceService (Triton's grpc_service.proto) by what the front
-- checks: "open" carry no model; "model" must name the public model (field 1 of the message);
-- "admin" are Triton's restricted protocols (Triton checks the admin key).
local GRPC_METHODS = {
    ServerLive = "open", ServerReady = "open", ServerMetadata = "open",
    ModelReady = "model", ModelMetadata = "model", ModelConfig = "model",
    ModelStatistics = "model", ModelInfer = "model",
    ModelStreamInfer = "stream",
    RepositoryIndex = "admin", RepositoryModelLoad = "admin", RepositoryModelUnload = "admin",
    SystemSharedMemoryStatus = "admin", SystemSharedMemoryRegister = "admin",
    SystemSharedMemoryUnregister = "admin", CudaSharedMemoryStatus = "admin",
    CudaSharedMemoryRegister = "admin", CudaSharedMemoryUnregister = "admin",
    TraceSetting = "admin", LogSettings = "admin",
}

local function varint(s, i)
    local value, scale = 0, 1
    for _ = 1, 10 do
        local b = byte(s, i)
        if b == nil then
            return nil
        end
        i = i + 1
        value = value + (b % 128) * scale
        if b < 128 then
            return value, i
        end
        scale = scale * 128
    end
    return nil
end

--- Every value of field 1 (length-delimited) among the top-level fields of a protobuf message
--- s[i..j]; nil when the message does not parse.
local function field1_values(s, i, j)
    local values = {}
    while i <= j do
        local key
        key, i = varint(s, i)
        if key == nil then
            return nil
        end
        local field, wire = floor(key / 8), key % 8
        if field == 0 then
            return nil
        end
        if wire == 0 then
            local v
            v, i = varint(s, i)
            if v == nil then
                return nil
            end
        elseif wire == 1 then
            i = i + 8
        elseif wire == 5 then
            i = i + 4
        elseif wire == 2 then
            local n
            n, i = varint(s, i)
            if n == nil or i + n - 1 > j then
                return nil
            end
            if field == 1 then
                values[#values + 1] = sub(s, i, i + n - 1)
            end
            i = i + n
        else
            return nil -- groups: not in Triton's protocol
        end
        if i > j + 1 then
            return nil
        end
    end
    return values
end

--- access_by_lua of the gRPC port.
function M.grpc()
    local method = string.match(ngx.var.uri, "^/inference%.GRPCInferenceService/(%w+)$")
    local kind = method and GRPC_METHODS[method]
    if ngx.var.uri == "/grpc.health.v1.Health/Check" then
        kind = "open"
    end
    if kind == nil then
        return grpc_refuse(GRPC_UNIMPLEMENTED, "not_found", "unknown method " .. ngx.var.uri)
    end
    if kind == "stream" then
        return grpc_refuse(GRPC_UNIMPLEMENTED, "stream", "ModelStreamInfer is not served "
            .. "through the front (no model here is decoupled): use ModelInfer")
    end
    if not identity_only("grpc-encoding") or not identity_only("content-encoding") then
        return grpc_refuse(GRPC_UNIMPLEMENTED, "compressed", "compressed messages are not "
            .. "accepted (grpc-encoding): send them uncompressed")
    end
    if not read_body_within_deadline() then
        return grpc_refuse(GRPC_INVALID_ARGUMENT, "slow_body", "the request did not arrive "
            .. "within " .. cfg.body_deadline_s .. " s")
    end
    if kind == "model" then
        local body = body_bytes(nil)
        -- one uncompressed length-prefixed message: flag 0, 4-byte big-endian length
        if body == nil or #body < 5 or byte(body, 1) ~= 0 then
            return grpc_refuse(GRPC_INVALID_ARGUMENT, "bad_request", "one uncompressed "
                .. "gRPC message expected")
        end
        local b2, b3, b4, b5 = byte(body, 2, 5)
        local length = ((b2 * 256 + b3) * 256 + b4) * 256 + b5
        if length ~= #body - 5 then
            return grpc_refuse(GRPC_INVALID_ARGUMENT, "bad_request", "one gRPC message "
                .. "expected (unary call)")
        end
        local names = field1_values(body, 6, #body)
        if names == nil then
            return grpc_refuse(GRPC_INVALID_ARGUMENT, "bad_request", "the message does not "
                .. "parse as protobuf")
        end
        if #names == 0 then
            return grpc_refuse(GRPC_NOT_FOUND, "not_found", "the request names no model; "
                .. "this endpoint serves only '" .. cfg.public_model .. "'")
        end
        for _, name in ipairs(names) do
            if name ~= cfg.public_model then
                return grpc_refuse(GRPC_NOT_FOUND, "not_found", "this endpoint serves only '"
                    .. cfg.public_model .. "'")
            end
        end
    end
    if kind ~= "open" and not take_slot() then
        return grpc_refuse(GRPC_UNAVAILABLE, "over_limit", "over " .. cfg.max_in_flight
            .. " requests in flight: retry later")
    end
end

-- ---------------------------------------------------------------------------------- counters

--- content_by_lua of the front's loopback status page: its counters in Prometheus' text format.
function M.status()
    ngx.header["Content-Type"] = "text/plain; version=0.0.4"
    local lines = {
        "# HELP crisis_front_in_flight Requests the front is proxying to tritonserver now.",
        "# TYPE crisis_front_in_flight gauge",
        "crisis_front_in_flight " .. (state:get("in_flight") or 0),
        "# HELP crisis_front_refused_total Requests the front answered itself, by reason.",
        "# TYPE crisis_front_refused_total counter",
    }
    for _, reason in ipairs(cfg.reasons) do
        lines[#lines + 1] = 'crisis_front_refused_total{reason="' .. reason .. '"} '
            .. (state:get("refused:" .. reason) or 0)
    end
    ngx.say(table.concat(lines, "\n"))
end

--- log_by_lua of the locations that answer nginx's own refusals (body cap, per-client limit,
--- Triton unreachable, ...): counted by reason, and a slot the request held is given back.
function M.log_status(reason)
    count(reason)
    M.done()
end

return M
