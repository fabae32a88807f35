-- Argo CD health check for kondense.io/CompressionPipeline (Lua 5.1; reads `obj`, returns `hs`).
-- Install it in argocd-cm under the key resource.customizations.health.kondense.io_CompressionPipeline.
--   Healthy      the Ready condition is True
--   Degraded     the Failed condition is True (message: its message)
--   Progressing  anything else: no status yet, the operator has not yet seen the latest spec
--                (status.observedGeneration < metadata.generation), stages pending or running
local hs = { status = "Progressing", message = "Waiting for the operator" }

-- The first of the given strings that is set and not empty. select("#", ...) counts nil
-- arguments too: ipairs would stop at the first nil and never reach the fallbacks after it.
local function first(...)
  for i = 1, select("#", ...) do
    local text = select(i, ...)
    if text ~= nil and text ~= "" then
      return text
    end
  end
  return nil
end

if obj.status == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready, failed = nil, nil
for _, condition in ipairs(obj.status.conditions or {}) do
  -- A condition written for an older spec says nothing about the current one.
  local current = generation == nil or condition.observedGeneration == nil or condition.observedGeneration >= generation
  if current and condition.type == "Ready" then
    ready = condition
  elseif current and condition.type == "Failed" then
    failed = condition
  end
end

if failed ~= nil and failed.status == "True" then
  hs.status = "Degraded"
  hs.message = first(failed.message, failed.reason, "Failed")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = first(ready.message, ready.reason, "Ready")
  return hs
end

if ready ~= nil and first(ready.message) ~= nil then
  hs.message = ready.message
elseif obj.status.progress ~= nil then
  hs.message = "Stages done: " .. obj.status.progress
end
return hs
