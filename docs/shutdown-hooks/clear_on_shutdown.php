<?php
// Clear this bot's presence sessions when it shuts down (PHP 8, no extensions).
//
// Call clear_presence_sessions() from your worker's shutdown path, e.g.
// register_shutdown_function() or a pcntl_signal(SIGTERM, ...) handler.

function clear_presence_sessions(string $reaper, string $owner, float $timeout = 35.0): array
{
    $context = stream_context_create(['http' => [
        'method' => 'POST',
        'header' => "Content-Type: application/json\r\n",
        'content' => json_encode(['owner' => $owner]),
        'timeout' => $timeout,
        'ignore_errors' => true,
    ]]);
    $body = @file_get_contents($reaper . '/v1/clear-all?wait=true', false, $context);
    if ($body === false) {
        throw new RuntimeException('presence-reaper did not answer');
    }
    $status = $http_response_header[0] ?? '';
    if (!str_contains($status, ' 200 ')) {
        throw new RuntimeException("presence-reaper answered $status: $body");
    }
    return json_decode($body, true, 8, JSON_THROW_ON_ERROR);
}

$reaper = getenv('PRESENCE_REAPER_URL') ?: 'http://127.0.0.1:7740';
$owner = getenv('BOT_OWNER') ?: 'my-bot';
$c = clear_presence_sessions($reaper, $owner);
printf("cleared %d, dropped %d, failed %d, pending %d\n", $c['cleared'], $c['dropped'], $c['failed'], $c['pending']);
exit(($c['failed'] === 0 && $c['pending'] === 0) ? 0 : 1);
