// Clear this bot's presence sessions when it shuts down (Go, stdlib only).
//
// Call clearPresenceSessions from your bot's shutdown path, e.g. after
// signal.NotifyContext(ctx, syscall.SIGTERM) fires and before main returns.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"time"
)

type counts struct {
	Cleared int `json:"cleared"`
	Dropped int `json:"dropped"`
	Failed  int `json:"failed"`
	Pending int `json:"pending"`
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

func clearPresenceSessions(reaper, owner string) (counts, error) {
	var c counts
	body, _ := json.Marshal(map[string]string{"owner": owner})
	client := &http.Client{Timeout: 35 * time.Second}
	resp, err := client.Post(reaper+"/v1/clear-all?wait=true", "application/json", bytes.NewReader(body))
	if err != nil {
		return c, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return c, fmt.Errorf("presence-reaper answered %s", resp.Status)
	}
	err = json.NewDecoder(resp.Body).Decode(&c)
	return c, err
}

func main() {
	c, err := clearPresenceSessions(getenv("PRESENCE_REAPER_URL", "http://127.0.0.1:7740"), getenv("BOT_OWNER", "my-bot"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot clear presence sessions:", err)
		os.Exit(1)
	}
	fmt.Printf("cleared %d, dropped %d, failed %d, pending %d\n", c.Cleared, c.Dropped, c.Failed, c.Pending)
	if c.Failed > 0 || c.Pending > 0 {
		os.Exit(1)
	}
}
