-- Argo CD resource health for amber.dev/AmberCompression.
-- Install: argocd-cm data key "resource.customizations.health.amber.dev_AmberCompression".
-- Reads only what the operator publishes: observedGeneration, phase and the
-- Ready / Stalled / Suspended conditions (docs/operator.md).
local hs = { status = "Progressing", message = "waiting for the operator" }
if obj.status == nil then
  return hs
end
local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end
local function is_true(name)
  return conditions[name] ~= nil and conditions[name].status == "True"
end
local function message_of(name, fallback)
  if conditions[name] ~= nil and conditions[name].message ~= nil and conditions[name].message ~= "" then
    return conditions[name].message
  end
  return fallback
end
if is_true("Stalled") or status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of("Stalled", "failed")
elseif is_true("Suspended") or status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "suspended; checkpoints kept"
elseif is_true("Ready") then
  hs.status = "Healthy"
  hs.message = message_of("Ready", "all stages succeeded")
elseif status.phase == "Queued" then
  hs.message = message_of("Reconciling", "waiting for admission by its queue")
else
  local progress = status.progress or ""
  local stage = status.currentStage or "starting"
  hs.message = "stage " .. stage .. " " .. progress
end
return hs
